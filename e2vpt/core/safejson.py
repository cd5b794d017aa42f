"""The one JSON reader for untrusted input: nesting depth bounded, finite numbers only, typed errors.

Python's `json.loads` recurses once per nesting level: a body of 100,000 ``[`` raises `RecursionError`,
and a value nested just below the interpreter's limit parses but breaks whatever walks it next (response
encoders, `json.dumps`, pydantic). It also accepts ``NaN``, ``Infinity`` and ``1e999`` (which becomes
``inf``). `loads` refuses all of these with the caller's typed error (`BadRequest` by default) before or
while parsing, so no request can turn into a 500 or take a worker's batch down.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from e2vpt.errors import BadRequest, E2VPTError

DEFAULT_MAX_DEPTH = 32


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in `data` (brackets inside strings are not counted).

    Linear time without recursion; for malformed input the number is an upper bound of what a parser
    would reach before failing, which is all a depth limit needs."""
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    # Escapes first (C speed, no regex): pairs of backslashes read left to right as JSON does, then
    # escaped quotes. Every quote left opens or closes a string.
    text = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    in_string = (np.cumsum(text == ord('"'), dtype=np.int64) & 1).astype(bool)
    step = np.zeros(text.shape, dtype=np.int32)
    step[(text == ord("[")) | (text == ord("{"))] = 1
    step[(text == ord("]")) | (text == ord("}"))] = -1
    step[in_string] = 0
    return int(np.cumsum(step).max(initial=0))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is not finite")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are accepted)")


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    what: str = "JSON",
    error: type[E2VPTError] = BadRequest,
) -> Any:
    """Parse untrusted JSON. Raises `error` (a typed `E2VPTError`) for invalid UTF-8 or JSON, nesting
    deeper than `max_depth`, NaN/Infinity or a number that overflows to infinity."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{what} is nested {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: belt and braces
        raise error(f"{what} is not valid JSON: {exc}") from exc
