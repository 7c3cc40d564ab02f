"""The server's HTTP API as the page needs it: JSON in, JSON out, every failure one readable message."""

from typing import Any

import httpx

TIMEOUT = httpx.Timeout(10.0, connect=2.0)  # a wrong host fails fast; a slow model still answers


class ServerError(Exception):
    """The server answered with an error: `str()` is its `detail`, made readable."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Unreachable(Exception):
    """Nothing (or nothing speaking HTTP) answers at the URL."""


def readable_detail(detail: Any) -> str:
    """The `detail` of an error answer as one line: FastAPI's 422 list becomes `field: message; ...`."""
    if isinstance(detail, list):
        return "; ".join(_validation_message(item) for item in detail)
    return str(detail)


def _validation_message(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    location = ".".join(str(part) for part in item.get("loc", []) if part != "body")
    return f"{location}: {item.get('msg', '')}" if location else str(item.get("msg", ""))


class PolicyClient:
    """One call per method, each a fresh connection: the page reruns its script on every click anyway."""

    def __init__(self, url: str, api_key: str, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.url = url.strip().rstrip("/")
        self._headers = {"access-token": api_key} if api_key else {}
        self._timeout = timeout

    def get(self, path: str) -> Any:
        return self._request("GET", path, None)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def ready(self) -> bool:
        """True once the policy answers (`/ready` is 200); False while loading or unreachable."""
        try:
            return httpx.get(f"{self.url}/ready", timeout=self._timeout).status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL):
            return False

    def _request(self, method: str, path: str, body: Any) -> Any:
        try:
            response = httpx.request(method, f"{self.url}{path}", json=body, headers=self._headers, timeout=self._timeout)
        except httpx.InvalidURL as exc:
            raise Unreachable(f"{self.url!r} is not a URL ({exc}); write it as http://HOST:PORT") from exc
        except httpx.UnsupportedProtocol as exc:
            raise Unreachable(f"{self.url!r} is not an http:// or https:// URL") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"Nothing answers at {self.url} ({type(exc).__name__}: {exc or 'no answer'})") from exc
        if response.is_success:
            return _json(response)
        raise ServerError(response.status_code, f"{response.status_code}: {_error_detail(response)}")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(response.status_code, f"{response.status_code}: the answer is not JSON: {response.text[:200]!r}") from exc


def _error_detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    return readable_detail(body.get("detail", body) if isinstance(body, dict) else body)
