"""The one HTTP client of the registry API (`RegistryClient`), used by `e2vpt tasks ...`,
`e2vpt train --register` and scripts/demo.py.

Every failure is typed: `RegistryUnreachable` (no connection, timeout) or `RegistryRequestError`
(the registry answered 4xx/5xx; its status and error code are kept). A request that failed for want of
the registry or its Redis is retried (`registry_client_retries`) when a retry is safe: the request cannot
have changed anything (no connection was made; a 503 with Retry-After, which the registry answers without
trying Redis), or it is idempotent (GET; PUT, since the registry stores the current file again as a no-op).
A rollback (POST) or a DELETE whose outcome is unknown is never repeated. `register_prompt_set` is the
training side's one call: it turns both into `RegistrationFailed` with a hint for a bad token.
Imports no torch: the CLI stays light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx

from e2vpt.config import Settings, get_settings
from e2vpt.errors import RegistrationFailed, RegistryRequestError, RegistryUnreachable
from e2vpt.registry.conditions import NO_CONDITION, Precondition

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT"})
UNAVAILABLE = frozenset({502, 503, 504})
MAX_WAIT_S = 30.0  # the longest a client sleeps before one retry (a server's Retry-After included)


def read_token(settings: Settings) -> str | None:
    """The registry token: the secret file wins over the environment; blank means none. The API checks
    writes against it, the clients send it."""
    if settings.registry_token_file:
        token = Path(settings.registry_token_file).read_text().strip()
    else:
        token = (settings.registry_token or "").strip()
    return token or None


class RegistryClient:
    """A small typed client of the registry API."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 30.0, retries: int | None = None
    ) -> None:
        """`retries`: how often a failed request is retried where that is safe (default: the settings')."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries = get_settings().registry_client_retries if retries is None else retries

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, url: str | None = None, token: str | None = None
    ) -> RegistryClient:
        """URL and token given here win over the settings (`registry_url`, `registry_token[_file]`)."""
        settings = settings or get_settings()
        return cls(
            url or settings.registry_url,
            token or read_token(settings),
            settings.registry_client_timeout,
            settings.registry_client_retries,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)  # so never applied
                wait = _retry_wait(attempt, safe=never_sent, method=method)
                if attempt == self.retries or wait is None:
                    raise RegistryUnreachable(
                        f"the registry at {self.url} is unreachable: {type(exc).__name__}: {exc}"
                    ) from exc
                why = type(exc).__name__
            else:
                after = response.headers.get("retry-after")
                wait = (
                    _retry_wait(attempt, safe=after is not None, method=method, retry_after=after)
                    if response.status_code in UNAVAILABLE
                    else None
                )
                if attempt == self.retries or wait is None:
                    break
                why = f"HTTP {response.status_code}"
            log.warning(
                "registry %s %s: %s; retry %d/%d in %.1f s",
                method,
                path,
                why,
                attempt + 1,
                self.retries,
                wait,
            )
            time.sleep(wait)
        if response.status_code >= 400:
            try:
                body = response.json()
                code, detail = str(body.get("error", "registry_error")), str(body.get("detail", body))
            except (ValueError, AttributeError):
                code, detail = "registry_error", response.text[:500] or response.reason_phrase
            raise RegistryRequestError(detail, status=response.status_code, code=code)
        return response

    def register(self, data: bytes, task_id: str, *, when: Precondition = NO_CONDITION) -> dict[str, Any]:
        """PUT a prompt-set file under `task_id`; the registry's JSON ({task_id, version, ...}).

        `when` (here and in `rollback`, `delete`): only if it holds for the current version, else the
        registry answers 412 (`RegistryRequestError`, code "precondition_failed") and changes nothing."""
        headers = {"Content-Type": "application/octet-stream", **when.headers()}
        return self._request("PUT", f"/tasks/{task_id}", content=data, headers=headers).json()

    def list_page(self, cursor: str = "0", limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        body = self._request("GET", "/tasks", params={"cursor": cursor, "limit": limit}).json()
        return body["tasks"], body["next_cursor"]

    def iter_tasks(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        cursor: str | None = "0"
        while cursor is not None:
            tasks, cursor = self.list_page(cursor, page_size)
            yield from tasks

    def show(self, task_id: str, version: int | None = None) -> dict[str, Any]:
        params = {"version": version} if version is not None else {}
        return self._request("GET", f"/tasks/{task_id}", params=params).json()

    def versions(self, task_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/tasks/{task_id}/versions").json()["versions"]

    def file(self, task_id: str, version: int | None = None) -> tuple[bytes, int]:
        params = {"version": version} if version is not None else {}
        response = self._request("GET", f"/tasks/{task_id}/file", params=params)
        return response.content, int(response.headers["X-Task-Version"])

    def rollback(self, task_id: str, version: int, *, when: Precondition = NO_CONDITION) -> dict[str, Any]:
        body = {"version": version}
        return self._request("POST", f"/tasks/{task_id}/rollback", json=body, headers=when.headers()).json()

    def delete(self, task_id: str, *, when: Precondition = NO_CONDITION) -> None:
        self._request("DELETE", f"/tasks/{task_id}", headers=when.headers())


def _retry_wait(attempt: int, *, safe: bool, method: str, retry_after: str | None = None) -> float | None:
    """Seconds to wait before retrying, or None when a retry is not safe: only a request that cannot have
    changed anything (`safe`) or an idempotent one is repeated. Retry-After (seconds) wins over the
    exponential 0.5, 1, 2, ... s; both are capped at MAX_WAIT_S."""
    if not safe and method.upper() not in IDEMPOTENT:
        return None
    try:
        wait = float(retry_after) if retry_after is not None else 0.5 * 2**attempt
    except ValueError:  # an HTTP date: not sent by this registry; wait as if it had said nothing
        wait = 0.5 * 2**attempt
    return min(max(wait, 0.0), MAX_WAIT_S)


class Registrable(Protocol):
    """What `register_prompt_set` needs of a prompt set (a `PromptSet`; no torch import here)."""

    task_id: str

    def to_bytes(self) -> bytes: ...


def register_prompt_set(
    url: str,
    prompt_set: Registrable | bytes,
    *,
    task_id: str | None = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Register a set (`e2vpt train --register`); the registry's JSON. Any failure: `RegistrationFailed`."""
    from e2vpt.core.promptset import check_task_id

    if isinstance(prompt_set, bytes | bytearray | memoryview):
        body = bytes(prompt_set)
    else:
        task_id = task_id or prompt_set.task_id
        body = prompt_set.to_bytes()
    if not task_id:
        raise RegistrationFailed("a task id is needed to register raw bytes")
    check_task_id(task_id)
    try:
        with RegistryClient(url, token, timeout) as client:
            data = client.register(body, task_id)
    except RegistryUnreachable as exc:
        raise RegistrationFailed(f"cannot reach the registry: {exc.message}") from exc
    except RegistryRequestError as exc:
        hint = " (check --token)" if exc.http_status in (401, 403) else ""
        raise RegistrationFailed(
            f"registry refused {task_id!r} with HTTP {exc.http_status}{hint}: {exc.message}"
        ) from exc
    except ValueError as exc:  # an answer without JSON
        raise RegistrationFailed(f"registry answered without JSON: {exc}") from exc
    if not isinstance(data, dict) or "version" not in data:
        raise RegistrationFailed(f"registry answered without a version: {data!r}")
    return data
