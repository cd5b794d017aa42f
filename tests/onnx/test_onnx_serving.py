"""The onnxruntime backend in the serving path: the same answers and the same errors as the torch backend,
in the MultiTaskEngine and through a real TorchServe (one .mar, one instance per backend)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from e2vpt.config import Settings
from e2vpt.core.backbone import Backbone, save_checkpoint
from e2vpt.core.promptset import PromptSet
from e2vpt.dev.images import image_bytes
from e2vpt.onnx.export import export_onnx
from e2vpt.registry.store import PromptStore
from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
from e2vpt.torchserve.archive import TorchServe, build_mar

# (task id, P, T, C): four tasks with different prompt counts and class counts, one with P = T = 0.
TASKS = [("cars", 4, 2, 5), ("pets", 1, 3, 7), ("flowers", 0, 0, 3), ("dtd", 3, 0, 4)]


@pytest.fixture
def store(backbone: Backbone, redis_url: str, namespace: str) -> Iterator[PromptStore]:
    st = PromptStore(redis_url, backbone.info, namespace=namespace)
    g = torch.Generator().manual_seed(11)
    for task_id, p, t, c in TASKS:
        ps = PromptSet.create(task_id, backbone.info, [f"{task_id}-{i}" for i in range(c)], num_prompts=p,
                              num_kv=t, generator=g)  # fmt: skip
        ps.head_weight = torch.randn(c, backbone.info.embed_dim, generator=g) * 0.2
        st.register(ps)
    yield st
    st.drop_all()
    st.close()


@pytest.fixture(scope="module")
def graph(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "tiny.onnx"
    return export_onnx(backbone, path, max_prompts=4, max_kv=3, exporter="legacy", opset=17)


def requests() -> list[tuple[str, bytes]]:
    tasks = ["cars", "pets", "flowers", "dtd", "pets", "cars", "flowers", "dtd"]
    return [(t, image_bytes(40 + i, (44 + i, 36))) for i, t in enumerate(tasks)]


def same_answers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["task_id"] == y["task_id"] and x.get("version") == y.get("version")
        if "predictions" in x:
            assert [p["label"] for p in x["predictions"]] == [p["label"] for p in y["predictions"]]
            assert [p["score"] for p in x["predictions"]] == pytest.approx(
                [p["score"] for p in y["predictions"]], abs=1e-4
            )
        else:
            assert x == y


def test_engine_answers_and_errors_equal_across_backends(
    backbone: Backbone, store: PromptStore, graph: Path
) -> None:
    items: list[RequestItem] = [RequestItem(t, im, top_k=3) for t, im in requests()]
    items += [RequestItem("no-such-task", image_bytes(1)), RequestItem("cars", b"not an image")]
    answers = {}
    for kind in ("torch", "onnxruntime"):
        settings = Settings(backend=kind, onnx_path=str(graph), cache_version_check_ms=0)
        engine = MultiTaskEngine(backbone, store, settings)  # selected by settings, as in a worker
        assert engine.backend.name == kind
        try:
            results = engine.predict(items)
        finally:
            engine.close()
        answers[kind] = [
            r.to_dict()
            if isinstance(r, Result)
            else {"task_id": i.task_id, "status": r.http_status, **r.to_dict()}
            for i, r in zip(items, results, strict=True)
        ]
    same_answers(answers["torch"], answers["onnxruntime"])
    assert [a.get("status") for a in answers["onnxruntime"][-2:]] == [404, 400]
    assert all("predictions" in a for a in answers["onnxruntime"][:-2])


@pytest.mark.integration
def test_torchserve_onnxruntime_answers_equal_torch(
    backbone: Backbone, store: PromptStore, graph: Path, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    if not shutil.which("java"):
        pytest.skip("TorchServe needs Java")
    ckpt = save_checkpoint(
        backbone.model, backbone.info.name, backbone.info.model_kwargs, tmp_path / "bb.safetensors"
    )
    config = {
        "redis_url": redis_url,
        "store_namespace": namespace,
        "onnx_path": str(graph),
        "ts_batch_size": 8,
    }
    mar = build_mar(tmp_path / "store", checkpoint=ckpt, engine_config=config, model_name="e2vpt_onnx")
    reqs = requests() + [("no-such-task", image_bytes(1)), ("cars", b"not an image")]
    answers: dict[str, list[dict[str, Any]]] = {}
    for kind in ("torch", "onnxruntime"):
        with TorchServe(mar, tmp_path / f"ts-{kind}", workers=1, env={"E2VPT_BACKEND": kind}) as ts:
            assert ts.ready_workers() == 1, ts.log_tail()
            out = []
            with httpx.Client(timeout=60) as client:
                for task_id, data in reqs:
                    r = client.post(ts.predictions_url, content=data,
                                    headers={**ts.auth(), "X-Task-Id": task_id, "Content-Type": "application/octet-stream"})  # fmt: skip
                    out.append({"task_id": task_id, "status": r.status_code, **r.json()})
            answers[kind] = out
    same_answers(answers["torch"], answers["onnxruntime"])
    assert [a["status"] for a in answers["onnxruntime"]] == [200] * 8 + [404, 400]
