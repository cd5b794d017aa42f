"""Hostile inputs of issue 13, in one place: every test that sends them (store, registry API, engine,
TorchServe, fuzz seeds) takes them from here, each with the typed error it must produce."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import torch
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.promptset import META_KEY, PromptSet
from e2vpt.errors import CorruptPromptSet, E2VPTError, IncompatiblePromptSet, InvalidPromptSet

DEEP = 100_000  # nesting depth of the deep-JSON inputs (RecursionError in a plain json.loads)


def deep_json(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


def good_set(info: BackboneInfo, task_id: str = "victim", **kw: object) -> PromptSet:
    g = torch.Generator().manual_seed(7)
    kw = {"num_prompts": 4, "num_kv": 2, **kw}
    return PromptSet.create(task_id, info, ["a", "b", "c"], generator=g, **kw)  # type: ignore[arg-type]


def with_metadata(ps: PromptSet, text: str) -> bytes:
    """The set's tensors with `text` as its metadata string (any JSON, or not JSON at all)."""
    return st_save({k: v.contiguous() for k, v in ps.tensors().items()}, metadata={META_KEY: text})


def with_tensors(ps: PromptSet, **tensors: torch.Tensor) -> bytes:
    """The set's file with some tensors replaced as given: no dtype conversion (`to_bytes` stores masks
    as uint8, which would hide a float or int64 mask)."""
    out = {**ps.tensors(), **tensors}
    return st_save(
        {k: v.contiguous() for k, v in out.items()}, metadata={META_KEY: json.dumps(ps.metadata())}
    )


def with_header(header: bytes, body: bytes = b"") -> bytes:
    """A safetensors-shaped payload with a hand-written header."""
    return len(header).to_bytes(8, "little") + header + body


def _meta_text(ps: PromptSet, **changes: object) -> str:
    meta = {**ps.metadata(), **changes}
    return json.dumps(meta)


def hostile_prompt_sets(
    info: BackboneInfo, task_id: str = "victim"
) -> dict[str, tuple[bytes, type[E2VPTError]]]:
    """name -> (prompt-set file, the typed error PromptSet.from_bytes(...).validate(info) raises)."""
    ps = good_set(info, task_id)
    L, P, D = ps.visual.shape
    meta = ps.metadata()
    # fmt: off
    cases: dict[str, tuple[bytes, type[E2VPTError]]] = {
        # shapes: the KV head axes are checked whatever T is (an empty KV of the wrong heads broke batches)
        "kv [L,1,7,0,13]": (with_tensors(ps, kv=torch.zeros(L, 1, 7, 0, 13)), IncompatiblePromptSet),
        "kv [L,1,0,0,0]": (with_tensors(ps, kv=torch.zeros(L, 1, 0, 0, 0)), IncompatiblePromptSet),
        "segment mask [P,0]": (with_tensors(ps, segment_mask=torch.zeros(P, 0, dtype=torch.uint8)), InvalidPromptSet),
        # values a GPU cannot serve: finite in float32, infinite in float16 (NaN scores for the task)
        "visual 1e5": (with_tensors(ps, visual=torch.full_like(ps.visual, 1e5)), InvalidPromptSet),
        "kv -7e4": (with_tensors(ps, kv=torch.full_like(ps.kv, -7e4)), InvalidPromptSet),
        # masks: uint8 0/1 only
        "token mask float 0.5": (with_tensors(ps, token_mask=torch.tensor([1.0, 0.5, 1.0, 0.0])), InvalidPromptSet),
        "token mask float nan": (
            with_tensors(ps, token_mask=torch.tensor([1.0, float("nan"), 1.0, 0.0])), InvalidPromptSet,
        ),
        "token mask int64 -1": (with_tensors(ps, token_mask=torch.tensor([1, -1, 1, 0])), InvalidPromptSet),
        "token mask uint8 2": (
            with_tensors(ps, token_mask=torch.tensor([1, 2, 1, 0], dtype=torch.uint8)), InvalidPromptSet,
        ),
        "segment mask uint8 2": (
            with_tensors(ps, segment_mask=torch.full((P, 16), 2, dtype=torch.uint8)), InvalidPromptSet,
        ),
        # JSON: bounded depth everywhere, finite numbers only, bounded size
        "header nested 100000": (with_header(b'{"a":' + deep_json() + b"}"), CorruptPromptSet),
        "metadata nested 100000": (with_metadata(ps, deep_json().decode()), CorruptPromptSet),
        "config nested 100000": (
            with_metadata(ps, _meta_text(ps)[:-1] + ', "x": ' + deep_json().decode() + "}"), CorruptPromptSet,
        ),
        "config nested 500": (with_metadata(ps, _meta_text(ps, config={"x": json.loads(deep_json(500))})), CorruptPromptSet),
        "metrics NaN": (with_metadata(ps, _meta_text(ps, metrics={"acc": float("nan")})), CorruptPromptSet),
        "metrics Infinity": (with_metadata(ps, _meta_text(ps, metrics={"acc": float("inf")})), CorruptPromptSet),
        "metrics 1e999": (with_metadata(ps, json.dumps(meta)[:-1] + ', "metrics": {"acc": 1e999}}'), CorruptPromptSet),
        "config 100 KB": (with_metadata(ps, _meta_text(ps, config={"blob": "x" * 100_000})), InvalidPromptSet),
        "label 1000 chars": (with_metadata(ps, _meta_text(ps, labels=["a", "b", "c" * 1000])), InvalidPromptSet),
        "created_at not a string": (with_metadata(ps, _meta_text(ps, created_at=[1])), InvalidPromptSet),
    }
    # fmt: on
    return cases


def broken_in_memory(
    info: BackboneInfo, task_id: str = "victim"
) -> dict[str, tuple[PromptSet, type[E2VPTError]]]:
    """Sets built in Python (the `register(ps)` path: training) that must be refused before any write."""
    ps = good_set(info, task_id)
    nested: dict[str, object] = {}
    node = nested
    for _ in range(100):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    return {
        "metrics NaN": (replace(ps, metrics={"acc": float("nan")}), InvalidPromptSet),
        "config tensor": (replace(ps, config={"t": torch.zeros(1)}), InvalidPromptSet),
        "config nested 100": (replace(ps, config=nested), InvalidPromptSet),
        "token mask float 0.5": (
            replace(ps, token_mask=torch.tensor([1.0, 0.5, 1.0, 0.0])),
            InvalidPromptSet,
        ),
        "segment mask [P,0]": (
            replace(ps, segment_mask=torch.zeros(4, 0, dtype=torch.uint8)),
            InvalidPromptSet,
        ),
        "kv [L,1,7,0,13]": (replace(ps, kv=torch.zeros(info.depth, 1, 7, 0, 13)), IncompatiblePromptSet),
        "head 3e38": (replace(ps, head_weight=ps.head_weight * 0 + 3e38), InvalidPromptSet),
    }


# values that land on length, count and offset fields (0, 1, boundaries, JPEG segment lengths, markers)
SPECIAL_BYTES = (0x00, 0x01, 0x03, 0x08, 0x7F, 0x80, 0xC2, 0xDA, 0xE1, 0xFF)
SPECIAL_INTS = (0, 1, 2, 6, 7, 14, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(draw: st.DrawFn, seed: bytes, header: int = 64, *, header_only: bool = False) -> bytes:
    """1-4 mutations of a file (bit flips, special bytes, 16/32-bit integers either endian, truncation,
    inserted or deleted runs); half of them (all, `header_only`) in its first `header` bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        hi = len(data) - 1 if not header_only and draw(st.booleans()) else min(header - 1, len(data) - 1)
        pos = draw(st.integers(0, max(0, hi)))
        kind = draw(st.sampled_from(("flip", "byte", "int", "truncate", "insert", "delete")))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.sampled_from((*SPECIAL_BYTES, draw(st.integers(0, 255)))))
        elif kind == "int":
            fmt = draw(st.sampled_from(("<H", ">H", "<I", ">I")))
            value = draw(st.sampled_from((*SPECIAL_INTS, draw(st.integers(0, 2**32 - 1)))))
            width = struct.calcsize(fmt)
            if pos + width <= len(data):
                data[pos : pos + width] = struct.pack(fmt, value % 2 ** (8 * width))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)
