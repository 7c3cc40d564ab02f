"""The server's HTTP API as the page needs it: JSON in, JSON out, every failure one readable message."""

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Reply:
    """A prediction's JSON, and the policy and version that computed it (its X-Policy-* headers)."""

    body: Any
    policy: str | None = None
    version: str | None = None
    step: int | None = None  # X-Episode-Step: the decision was logged as this step of the episode named


@dataclass(frozen=True)
class Listing:
    """`GET /policies` as the page needs it: the policies that answer, the default, and why the others do not."""

    names: list[str]
    default: str | None
    unservable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Any) -> "Listing":
        """Read leniently: whatever is not a listing of policies is none (a server of one policy, then)."""
        entries = body.get("policies") if isinstance(body, dict) else None
        policies = [entry for entry in entries or [] if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
        served = [entry["name"] for entry in policies if "active" in entry]
        failed = {entry["name"]: str(entry.get("error") or "") for entry in policies if "active" not in entry}
        default = body.get("default") if isinstance(body, dict) else None
        return cls(served, default if isinstance(default, str) else None, failed)

    @property
    def one_policy(self) -> bool:
        """One policy (the default, then): the page asks the root routes, as of a wave-1 server."""
        return len(self.names) <= 1


class PolicyClient:
    """One call per method, each a fresh connection: the page reruns its script on every click anyway.
    `prefix` is where the policy's routes are: "" (the root) or `/policies/NAME`."""

    def __init__(self, url: str, api_key: str, timeout: httpx.Timeout = TIMEOUT, prefix: str = "") -> None:
        self.url = url.strip().rstrip("/")
        self.prefix = prefix
        self._headers = {"access-token": api_key} if api_key else {}
        self._timeout = timeout

    def get(self, path: str) -> Any:
        return self._request("GET", path, None).body

    def ask(self, path: str, body: Any, params: dict[str, str] | None = None) -> Reply:
        return self._request("POST", path, body, params)

    def ready(self) -> bool:
        """True once the policy answers (`/ready` is 200); False while loading or unreachable."""
        try:
            return httpx.get(f"{self.url}/ready", timeout=self._timeout).status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL):
            return False

    def _request(self, method: str, path: str, body: Any, params: dict[str, str] | None = None) -> Reply:
        try:
            response = httpx.request(
                method, f"{self.url}{self.prefix}{path}", json=body, params=params, headers=self._headers, timeout=self._timeout
            )
        except httpx.InvalidURL as exc:
            raise Unreachable(f"{self.url!r} is not a URL ({exc}); write it as http://HOST:PORT") from exc
        except httpx.UnsupportedProtocol as exc:
            raise Unreachable(f"{self.url!r} is not an http:// or https:// URL") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"Nothing answers at {self.url} ({type(exc).__name__}: {exc or 'no answer'})") from exc
        if response.is_success:
            step = response.headers.get("x-episode-step")
            headers = response.headers
            return Reply(
                _json(response), headers.get("x-policy-name"), headers.get("x-policy-version"), None if step is None else int(step)
            )
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
