"""Sending a trained prompt set to the registry API (`e2vpt train --register URL`).

PUT {URL}/tasks/{task_id} with the file bytes (application/octet-stream, `Authorization: Bearer`);
the registry answers 201 with JSON {task_id, version}. Anything else raises `RegistrationFailed`
with the registry's status and detail."""

from __future__ import annotations

from typing import Any

import httpx

from e2vpt.core.promptset import PromptSet, check_task_id
from e2vpt.errors import RegistrationFailed


def register_prompt_set(
    url: str,
    prompt_set: PromptSet | bytes,
    *,
    task_id: str | None = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Register a set; returns the registry's JSON ({task_id, version})."""
    if isinstance(prompt_set, PromptSet):
        task_id = task_id or prompt_set.task_id
        body = prompt_set.to_bytes()
    else:
        body = bytes(prompt_set)
    if not task_id:
        raise RegistrationFailed("a task id is needed to register raw bytes")
    check_task_id(task_id)
    target = f"{url.rstrip('/')}/tasks/{task_id}"
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = httpx.put(target, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise RegistrationFailed(
            f"cannot reach the registry at {target}: {type(exc).__name__}: {exc}"
        ) from exc
    if resp.status_code != 201:
        try:
            data = resp.json()
            detail = data.get("detail") or data.get("error") or data if isinstance(data, dict) else data
        except ValueError:
            detail = resp.text[:500]
        hint = " (check --token)" if resp.status_code in (401, 403) else ""
        raise RegistrationFailed(f"registry refused {task_id!r} with HTTP {resp.status_code}{hint}: {detail}")
    try:
        data = resp.json()
    except ValueError as exc:
        raise RegistrationFailed(f"registry answered 201 without JSON: {resp.text[:200]!r}") from exc
    if not isinstance(data, dict) or "version" not in data:
        raise RegistrationFailed(f"registry answered 201 without a version: {data!r}")
    return data
