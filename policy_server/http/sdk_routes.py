"""`/clients`: each policy's SDKs, generated from the OpenAPI of that policy's routes.

The root's `/clients` is the default policy's (its root routes and the service routes, as in wave
1); `/policies/{name}/clients` is that policy's own routes. Generation is cached by the spec's
content, so a new schema gives new SDKs and an unchanged one is never generated twice.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from policy_server.clients import LANGUAGES, ClientSDKError, ClientSDKs, SDKsNotReady, UnknownLanguage
from policy_server.http.errors import ErrorDetail, detail_response

OpenAPI = dict[str, Any]

ZIP_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/zip": {}}, "description": "A zip of the SDKs"},
    404: {"model": ErrorDetail, "description": "No SDK for that language; the detail lists the languages"},
    503: {"model": ErrorDetail, "description": "Being generated (see Retry-After), or no Java runtime to generate with"},
}


class PolicySDKs:
    """One policy's SDK generator, made again when its routes' OpenAPI changes."""

    def __init__(self, name: str, cache_dir: Path, openapi: Callable[[], OpenAPI]) -> None:
        self.name = name
        self.cache_dir = cache_dir
        self.openapi = openapi  # the spec of this policy's routes, as the app serves them now
        self._current: ClientSDKs | None = None

    def sdks(self) -> ClientSDKs:
        spec = self.openapi()
        if self._current is None or self._current.openapi != spec:
            self._current = ClientSDKs(spec, self.name, self.cache_dir)
        return self._current

    async def start(self) -> None:
        await self.sdks().start()

    async def stop(self) -> None:
        if self._current is not None:
            await self._current.stop()

    async def archive(self, language: str | None) -> Response:
        sdks = self.sdks()
        await sdks.start()  # at once if already started or generated
        try:
            path = sdks.archive(language)
        except UnknownLanguage as exc:
            return detail_response(404, str(exc))
        except SDKsNotReady as exc:
            return detail_response(503, str(exc), {"Retry-After": str(exc.retry_after)})
        except ClientSDKError as exc:  # no Java, or the generator failed (logged): the server is fine
            return detail_response(503, str(exc))
        return FileResponse(path, media_type="application/zip", filename=f"{self.name}-{language or 'clients'}.zip")


def add_sdk_routes(router: APIRouter, sdks: PolicySDKs, operation_prefix: str) -> None:
    async def all_clients() -> Response:
        return await sdks.archive(None)

    async def one_client(language: str) -> Response:
        return await sdks.archive(language)

    common: dict[str, Any] = {"methods": ["GET"], "response_class": Response, "responses": ZIP_RESPONSES}
    router.add_api_route(
        "/clients", all_clients, operation_id=f"{operation_prefix}clients", summary=f"SDKs for {', '.join(LANGUAGES)}, one zip", **common
    )
    router.add_api_route(
        "/clients/{language}", one_client, operation_id=f"{operation_prefix}client", summary="The SDK for one language, a zip", **common
    )
