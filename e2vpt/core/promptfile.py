"""The prompt-set file's header, read without torch: a safetensors payload whose `__metadata__` holds the
prompt set's JSON under `META_KEY`. `e2vpt.core.promptset` reads and validates the whole file; clients that
only need the metadata (the task id, for `e2vpt tasks register`) use this and stay light."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from e2vpt.core import safejson
from e2vpt.errors import CorruptPromptSet, E2VPTError, PromptSetTooLarge

META_KEY = "e2vpt"
MAX_METADATA_DEPTH = 16


def read_file(path: str | Path, limit: int, too_large: type[E2VPTError] = PromptSetTooLarge) -> bytes:
    """A file's bytes (a prompt set's, an image to send), if it is a regular file of at most `limit` bytes:
    a FIFO would block the open, a device (/dev/zero, size 0) would be read forever, a huge file read whole
    only to be refused. FileNotFoundError if it is missing, OSError if it is not a regular file, `too_large`."""
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):
        raise OSError(f"{path} is not a regular file")
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise too_large(f"{path} is {path.stat().st_size} bytes; the limit is {limit}")
    return data


def read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata of a safetensors payload, parsed by hand (depth-bounded, finite numbers only)
    so that corrupt or hostile input fails with a typed error."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise CorruptPromptSet("payload is shorter than a safetensors header")
    header_len = int.from_bytes(bytes(data[:8]), "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CorruptPromptSet("not a safetensors file (header length does not fit the payload; truncated?)")
    # the header is {"__metadata__": {"e2vpt": "<json>"}, "<tensor>": {...}, ...}: 3 levels
    header = safejson.loads(
        bytes(data[8 : 8 + header_len]), max_depth=3, what="safetensors header", error=CorruptPromptSet
    )
    try:
        text = header["__metadata__"][META_KEY]
    except (KeyError, TypeError) as exc:
        raise CorruptPromptSet(f"safetensors header has no '{META_KEY}' metadata") from exc
    if not isinstance(text, str):
        raise CorruptPromptSet(f"safetensors metadata '{META_KEY}' is not a string")
    meta = safejson.loads(
        text, max_depth=MAX_METADATA_DEPTH, what="prompt-set metadata", error=CorruptPromptSet
    )
    if not isinstance(meta, dict):
        raise CorruptPromptSet("prompt-set metadata is not a JSON object")
    return meta
