"""The product end to end on a GPU (issue 11): a real TorchServe whose two workers run the engine on CUDA
with the GPU defaults (fp16 weights and prompts, nvjpeg for photos, the CPU decoders for small images)
answers every request of a mixed burst as the offline fp32 model on the CPU does, within fp16's and
nvjpeg's differences, while poison items in the same batches fail alone.

Skips without CUDA. E2VPT_TEST_TORCHSERVE_DEVICE=cpu runs it with CPU workers: a check of the test itself
on a machine without a GPU (the GPU run kit runs it on CUDA: `pytest -m cuda`)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from e2vpt.core.backbone import Backbone
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.images import image_bytes, photo_jpeg, png_header_bomb, with_exif
from e2vpt.registry.store import PromptStore
from e2vpt.serving import TOP_K_HEADER
from e2vpt.torchserve.archive import TorchServe, build_mar
from tests.helpers import RedisServer, make_set, tiny_checkpoint
from tests.serving_helpers import burst, offline_predict

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which("java") or not shutil.which("redis-server"), reason="needs java + redis"
    ),
]

DEVICE = os.environ.get("E2VPT_TEST_TORCHSERVE_DEVICE", "cuda")
WORKERS = 2
# a class probability may differ from the CPU's fp32 answer by this much: fp16 logits (within 0.0025 of
# fp32 for ViT-B/16, gpu.md) and nvjpeg's pixels (<= 1 grey level from libjpeg's at 640x480)
SCORE_TOL = 0.03


@dataclass
class GpuServed:
    ts: TorchServe
    backbone: Backbone
    sets: dict[str, PromptSet]


@pytest.fixture(scope="module")
def gpu_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuServed]:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = tmp_path_factory.mktemp("gpu-served")
    redis = RedisServer(root / "redis").start()
    ckpt, backbone = tiny_checkpoint(root / "backbone.safetensors")
    store = PromptStore(redis.url, backbone.info, namespace=f"ts-gpu-{uuid.uuid4().hex[:8]}")
    sets = [
        make_set("g1", backbone, 3, 1),
        make_set("g2", backbone, 6, 2, num_prompts=4, num_kv=2, config={"recipe": "fgvc"}),
        make_set("g3", backbone, 4, 3, share_kv=False),
    ]
    for ps in sets:
        store.register(ps)
    # the device in the archive's engine.json, every other setting its default for that device
    mar = build_mar(root / "mar", checkpoint=ckpt, engine_config={"device": DEVICE})
    env = {"E2VPT_REDIS_URL": redis.url, "E2VPT_STORE_NAMESPACE": store.namespace}
    ts = TorchServe(mar, root / "ts", workers=WORKERS, batch_size=16, max_batch_delay_ms=50, env=env).start()
    try:
        yield GpuServed(ts, backbone, {ps.task_id: ps for ps in sets})
    finally:
        ts.stop()
        store.close()
        redis.stop()


def test_every_worker_runs_the_engine_on_the_device(gpu_served: GpuServed) -> None:
    log = (gpu_served.ts.workdir / "logs" / "model_log.log").read_text()
    devices = re.findall(r"e2vpt engine ready: backbone \S+ on (\S+),", log)
    assert len(devices) == WORKERS and all(d.startswith(DEVICE) for d in devices), devices


def test_mixed_burst_answers_as_the_offline_model_and_poison_fails_alone(gpu_served: GpuServed) -> None:
    kinds = ["raw", "json", "multipart"]
    images = [
        photo_jpeg(20),  # 640x480: nvjpeg
        image_bytes(21, (48, 40)),  # small PNG: the CPU decoders
        with_exif(photo_jpeg(22, (400, 300)), 6),  # nvjpeg, then rotated on the device
        photo_jpeg(23, (512, 384)),
        image_bytes(24, (64, 48), "JPEG"),  # a small JPEG: libjpeg on the CPU
        image_bytes(25, (35, 25), "WEBP"),
    ]
    good = [(kinds[i % 3], f"g{1 + i % 3}", images[i % len(images)]) for i in range(24)]
    photo = photo_jpeg(26)
    poison = [
        ("raw", "g1", photo[: len(photo) * 2 // 3]),  # a cut photo: 400 on every device
        ("raw", "g2", png_header_bomb()),  # 413
        ("raw", "g3", b"\xff\xd8\xff\xe0garbage"),  # 400
        ("raw", "no-such-task", photo),  # 404
    ]
    requests = [*good[:12], *poison, *good[12:]]
    # every class's score (top_k over the largest task's classes): the whole distribution is compared
    responses = burst(gpu_served.ts, requests, headers={TOP_K_HEADER: "6"})
    answers = responses[:12] + responses[12 + len(poison) :]
    assert [r.status_code for r in responses[12 : 12 + len(poison)]] == [400, 413, 400, 404]
    worst = 0.0
    for (_, task, data), r in zip(good, answers, strict=True):
        assert r.status_code == 200, r.text
        ps = gpu_served.sets[task]
        want = dict(offline_predict(gpu_served.backbone, ps, data, top_k=ps.num_classes))
        got = {p["label"]: p["score"] for p in r.json()["predictions"]}
        assert set(got) == set(want), (task, got, want)
        worst = max(worst, *(abs(got[label] - s) for label, s in want.items()))
        ranked = sorted(want.values(), reverse=True)
        if ranked[0] - ranked[1] > 2 * SCORE_TOL:  # a clear winner is the winner on the GPU too
            assert r.json()["predictions"][0]["label"] == max(want, key=want.__getitem__)
    assert worst <= SCORE_TOL, f"largest score difference from the CPU's fp32 answer: {worst:.4f}"
