"""The HTTP side of the `openai` backend: one pooled httpx client, JSON in and out, bounded retries.

Retried (exponential backoff with jitter, `Retry-After` honoured up to the cap): 429, 5xx, timeouts
and transport errors (refused or dropped connections: a server restarting). Retrying a generation is
safe: requests carry their seed, so a repeated request asks for the same tokens, and the caller keeps
exactly one answer per request. Any other 4xx is the caller's mistake and is raised at once
(`HttpError`, with the server's own message). After `attempts` tries, `ServerUnavailable`.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

VERSION_HEADERS = ("server", "openai-version", "x-powered-by")


class HttpError(ConnectionError):
    """A 4xx answer that retrying cannot fix (bad request, unknown model, bad key...)."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body or {}


class ServerUnavailable(ConnectionError):
    """The server kept failing (429 / 5xx / timeouts / no connection) for every attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries per request, the first included
    backoff_s: float = 0.5  # wait before the 2nd try; doubles each time (times a 0.5-1 jitter)
    max_backoff_s: float = 30.0

    def wait(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number `attempt` (0-based)."""
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if retry_after is not None:
            return min(self.max_backoff_s, max(base, retry_after))
        return base * random.uniform(0.5, 1.0)

    def record(self) -> dict:
        return asdict(self)


def root_urls(base_url: str) -> tuple[str, str]:
    """(API base ending in /v1, server root) from 'http://host:port' or 'http://host:port/v1'."""
    url = base_url.rstrip("/")
    api = url if url.endswith("/v1") else url + "/v1"
    return api, api[: -len("/v1")]


def _message(resp) -> tuple[str, dict]:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300], {}
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err)), body
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), body
    return str(body)[:300], body if isinstance(body, dict) else {}


def _retry_after(resp) -> float | None:
    try:
        return float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None


class Http:
    """JSON over one pooled httpx.Client (thread-safe), with the retry policy."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 8,
    ):
        import httpx

        self._httpx = httpx
        self.api, self.root = root_urls(base_url)
        self.retry = retry or RetryPolicy()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.retries = 0  # retried tries so far (all requests): the manifest reports it

    def get(self, path: str, *, root: bool = False, attempts: int | None = None):
        return self.request("GET", path, None, root=root, attempts=attempts)

    def post(self, path: str, body: dict, *, attempts: int | None = None):
        return self.request("POST", path, body, attempts=attempts)

    def request(self, method: str, path: str, body: dict | None, *, root: bool = False, attempts: int | None = None):
        """(JSON body, response headers) of a 2xx answer; HttpError for other 4xx; ServerUnavailable."""
        httpx = self._httpx
        url = (self.root if root else self.api) + path
        tries = attempts or self.retry.attempts
        last = ""
        for attempt in range(tries):
            retry_after = None
            try:
                resp = self.client.request(method, url, json=body)
            except httpx.TimeoutException as exc:
                last = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json(), dict(resp.headers)
                    except ValueError:
                        raise HttpError(resp.status_code, f"not JSON: {resp.text[:200]!r}") from None
                message, err_body = _message(resp)
                if resp.status_code != 429 and resp.status_code < 500:
                    raise HttpError(resp.status_code, message, err_body)
                last = f"HTTP {resp.status_code}: {message}"
                retry_after = _retry_after(resp)
            if attempt + 1 < tries:
                self.retries += 1
                time.sleep(self.retry.wait(attempt, retry_after))
        raise ServerUnavailable(f"{method} {url}: no answer after {tries} attempts; last: {last}")

    def close(self) -> None:
        self.client.close()


def version_headers(headers: dict) -> dict:
    """The headers that name the server software or its version."""
    return {k.lower(): v for k, v in headers.items() if k.lower() in VERSION_HEADERS or "version" in k.lower()}
