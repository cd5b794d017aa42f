"""Shared by the serving tests: the offline reference prediction, and requests sent to a TorchServe."""

from __future__ import annotations

import asyncio
import base64

import httpx
import torch

from e2vpt.core.backbone import Backbone
from e2vpt.core.images import decode_image, eval_transform
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.torchserve.archive import TorchServe


@torch.inference_mode()
def offline_predict(
    backbone: Backbone, ps: PromptSet, data: bytes, top_k: int = 5
) -> list[tuple[str, float]]:
    """The offline model: one image, one task, alone in its batch (no cache, no server)."""
    x = eval_transform(backbone.info, ps.recipe)(decode_image(data))[None]
    batch = TaskBatch.from_prompt_sets([ps.validate(backbone.info)])
    logits = PromptedViT(backbone).forward_multi(x, batch, torch.zeros(1, dtype=torch.long))[
        0, : ps.num_classes
    ]
    scores, idx = torch.softmax(logits, 0).topk(min(top_k, ps.num_classes))
    return [(ps.labels[j], float(s)) for s, j in zip(scores.tolist(), idx.tolist(), strict=True)]


async def _send(
    client: httpx.AsyncClient, url: str, kind: str, task: str | None, data: bytes
) -> httpx.Response:
    headers = {} if task is None or kind != "raw" else {"X-Task-Id": task}
    if kind == "raw":
        return await client.post(
            url, content=data, headers={**headers, "Content-Type": "application/octet-stream"}
        )
    if kind == "json":
        body = {"image": base64.b64encode(data).decode(), **({"task_id": task} if task else {})}
        return await client.post(url, json=body)
    files = {"image": ("x.png", data, "image/png")}
    return await client.post(url, data={"task_id": task} if task else {}, files=files)


def burst(
    ts: TorchServe,
    requests: list[tuple[str, str | None, bytes]],
    token: bool = True,
    headers: dict[str, str] | None = None,
) -> list[httpx.Response]:
    """Send all requests to a running TorchServe at once (so that it batches them together): (kind, task,
    image) each, kind one of raw / json / multipart; `headers` go with every request."""

    async def run() -> list[httpx.Response]:
        common = {**(ts.auth() if token else {}), **(headers or {})}
        async with httpx.AsyncClient(headers=common, timeout=60) as client:
            return await asyncio.gather(*(_send(client, ts.predictions_url, *r) for r in requests))

    return asyncio.run(run())
