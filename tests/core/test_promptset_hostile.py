"""Issue 13 on the prompt-set parser: every hostile file gets its typed 4xx, and a fuzz test of the parser
(hypothesis) finds zero untyped exceptions.

`E2VPT_FUZZ_PARSER_EXAMPLES` sets the number of mutations per strategy (default 1500, two strategies:
a few thousand per CI run); a nightly-style run: ``E2VPT_FUZZ_PARSER_EXAMPLES=50000 pytest -q
tests/core/test_promptset_hostile.py -k fuzz``."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2vpt.config import Settings
from e2vpt.core import safejson
from e2vpt.core.backbone import Backbone, BackboneInfo
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import BadRequest, E2VPTError, InvalidPromptSet
from tests.poison import broken_in_memory, deep_json, good_set, hostile_prompt_sets, with_metadata

EXAMPLES = int(os.environ.get("E2VPT_FUZZ_PARSER_EXAMPLES", "1500"))


def test_every_hostile_file_gets_its_typed_error(backbone: Backbone) -> None:
    for name, (data, exc_type) in hostile_prompt_sets(backbone.info).items():
        with pytest.raises(E2VPTError) as caught:
            PromptSet.from_bytes(data).validate(backbone.info)
        assert type(caught.value) is exc_type, f"{name}: {type(caught.value).__name__}: {caught.value}"
        assert 400 <= caught.value.http_status < 500, name


def test_every_broken_in_memory_set_is_refused(backbone: Backbone) -> None:
    for name, (ps, exc_type) in broken_in_memory(backbone.info).items():
        with pytest.raises(E2VPTError) as caught:
            ps.validate(backbone.info)
        assert type(caught.value) is exc_type, f"{name}: {type(caught.value).__name__}: {caught.value}"


def test_kv_heads_checked_when_t_is_zero(backbone: Backbone) -> None:
    info = backbone.info
    ok = good_set(info, num_kv=0)  # no KV prompts, but the right head shape: valid (VPT-only sets)
    assert ok.kv.shape == (info.depth, 1, info.num_heads, 0, info.head_dim)
    assert PromptSet.from_bytes(ok.to_bytes()).validate(info).num_kv == 0


def test_bool_masks_are_stored_as_uint8_and_counted_as_kept(backbone: Backbone) -> None:
    info = backbone.info
    ps = good_set(info, num_segments=16)
    g = torch.Generator().manual_seed(3)
    ps = replace(
        ps,
        visual=torch.randn(ps.visual.shape, generator=g),
        token_mask=torch.tensor([True, False, True, True]),
        segment_mask=torch.rand(4, 16, generator=g) > 0.5,
    ).validate(info)
    back = PromptSet.from_bytes(ps.to_bytes()).validate(info)
    assert back.token_mask.dtype == torch.uint8 and back.segment_mask.dtype == torch.uint8
    # num_parameters counts exactly the visual values the model sees (random values: none is 0)
    kept_visual = int((back.masked_visual() != 0).sum())
    assert (
        back.num_parameters
        == kept_visual + back.kv.numel() + back.head_weight.numel() + back.head_bias.numel()
    )


def test_metadata_limit_is_a_setting(backbone: Backbone) -> None:
    ps = good_set(backbone.info)
    ps = replace(ps, config=ps.config.updated(note="x" * 2000))
    data = ps.to_bytes()
    PromptSet.from_bytes(data).validate(backbone.info)
    with pytest.raises(InvalidPromptSet, match="E2VPT_MAX_METADATA_BYTES"):
        PromptSet.from_bytes(data, limits=Settings(max_metadata_bytes=1000).prompt_limits)


def test_safejson_bounds_depth_and_numbers() -> None:
    assert safejson.loads(b'{"a": ["[[[", {"b": "\\\\\\"]]"}]}') == {"a": ["[[[", {"b": '\\"]]'}]}
    assert safejson.json_depth(b'[["\\\\"], {"k": "\\"[["}]') == 2
    for bad in (deep_json(), b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"[1e999]", b"\xff", b"[1,"):
        with pytest.raises(BadRequest):
            safejson.loads(bad)
    with pytest.raises(BadRequest, match="nested 33 levels"):
        safejson.loads(deep_json(33))
    assert safejson.loads(deep_json(32)) == json.loads(deep_json(32))


# ---------------------------------------------------------------------- fuzz
def _check(data: bytes, info: BackboneInfo) -> None:
    """Any outcome but an untyped exception (or a typed one that is not a 4xx) is fine."""
    try:
        PromptSet.from_bytes(data).validate(info)
    except E2VPTError as exc:
        assert 400 <= exc.http_status < 500, f"{type(exc).__name__} -> {exc.http_status}: {exc}"


@pytest.fixture(scope="module")
def seeds(backbone: Backbone) -> list[bytes]:
    info = backbone.info
    ps = good_set(info)
    masked = replace(
        good_set(info, num_segments=16),
        token_mask=torch.tensor([1, 0, 1, 1], dtype=torch.uint8),
        segment_mask=torch.ones(4, 16, dtype=torch.uint8),
    )
    files = [ps.to_bytes(), masked.to_bytes(), good_set(info, num_kv=0, share_kv=False).to_bytes()]
    return files + [data for data, _ in hostile_prompt_sets(info).values() if len(data) < 200_000]


_FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@_FUZZ
@given(data=st.data())
def test_fuzz_byte_mutations(data: st.DataObject, seeds: list[bytes], backbone: Backbone) -> None:
    """Random edits of valid and hostile files: flipped, overwritten, inserted and deleted bytes,
    truncation, concentrated in the header (where the parser works) but anywhere in the file."""
    blob = bytearray(data.draw(st.sampled_from(seeds)))
    header_end = 8 + int.from_bytes(blob[:8], "little") if len(blob) >= 8 else len(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        if not blob:
            break
        in_header = data.draw(st.booleans())
        hi = max(1, min(len(blob), header_end)) if in_header else len(blob)
        pos = data.draw(st.integers(0, hi - 1))
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        if op == "flip":
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            blob[pos] = data.draw(st.sampled_from(b'[]{}",:\\0123456789eE-.ntfNI \x00\xff'))
        elif op == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del blob[pos : pos + data.draw(st.integers(1, 16))]
        elif op == "truncate":
            del blob[pos:]
        else:  # a header length that lies
            blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    _check(bytes(blob), backbone.info)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=30,
)


@_FUZZ
@given(
    field=st.sampled_from(
        [
            "task_id",
            "labels",
            "backbone",
            "fingerprint",
            "method",
            "config",
            "metrics",
            "created_at",
            "format_version",
            "recipe",
            "segment_layout",
            "kept_token_indices",
        ]
    ),  # fmt: skip
    value=_json_values,
    drop=st.booleans(),
)
def test_fuzz_metadata_values(field: str, value: object, drop: bool, backbone: Backbone) -> None:
    """Every metadata field (and config entry) replaced by arbitrary JSON, NaN and infinities included."""
    ps = good_set(backbone.info)
    meta = ps.metadata()
    if field in ("recipe", "segment_layout", "kept_token_indices"):
        meta["config"] = {**meta["config"], field: value}
    elif drop:
        meta.pop(field)
    else:
        meta[field] = value
    _check(with_metadata(ps, json.dumps(meta)), backbone.info)
