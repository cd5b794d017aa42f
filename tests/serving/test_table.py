"""The device-resident prompt table: batches gathered from it equal the `TaskBatch.from_prompt_sets` path
and each image alone; updates and deletes never show a batch half a task; eviction under a small budget
with thousands of registered tasks (real Redis); heads of a large class-count task without a
[batch, C, D] tensor."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest
import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from e2vpt.core.backbone import Backbone
from e2vpt.core.model import PromptedViT, TaskBatch
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import TaskNotFound
from e2vpt.registry.store import PromptStore
from e2vpt.serving import table as table_module
from e2vpt.serving.cache import PromptCache, compacted
from e2vpt.serving.table import PromptTable, TableBatch
from tests.core.test_model import images_for, make_set, mixed_sets
from tests.helpers import tiny_backbone, wait_for

TOL = 1e-4


@pytest.fixture(scope="module")
def model(backbone: Backbone) -> PromptedViT:
    return PromptedViT(backbone).eval()


def table_logits(model: PromptedViT, images: Tensor, batch: TableBatch) -> Tensor:
    return batch.logits(model.forward_features(images, *batch.prompts))


def reference_logits(model: PromptedViT, images: Tensor, sets: list[PromptSet], index: list[int]) -> Tensor:
    """The `TaskBatch.from_prompt_sets` path."""
    return model.forward_multi(images, TaskBatch.from_prompt_sets(sets), torch.tensor(index))


# ---------------------------------------------------------------------- equality with the other paths
def test_table_batch_equals_task_batch_and_each_image_alone(model: PromptedViT, backbone: Backbone) -> None:
    sets = mixed_sets(backbone)  # P 0..8, T 0..5, C 1..10, tied and separate KV, pruned (masked) sets
    table = PromptTable(backbone.info)
    slots = [table.insert(compacted(ps)) for ps in sets]
    g = torch.Generator().manual_seed(3)
    index = [int(i) for i in torch.randint(len(sets), (14,), generator=g)]
    images = images_for(backbone, len(index), seed=5)
    batch = table.gather([slots[i] for i in index])
    tasks = TaskBatch.from_prompt_sets(sets)
    ref = tasks.gather(torch.tensor(index))
    # the gathered prompts are the from_prompt_sets ones, padding included
    assert torch.equal(batch.prompts.visual, ref.visual) and torch.equal(batch.prompts.kv, ref.kv)
    assert torch.equal(batch.prompts.visual_valid, ref.visual_valid)
    assert torch.equal(batch.prompts.kv_valid, ref.kv_valid)
    assert batch.width == tasks.width == max(ps.num_classes for ps in sets)
    with torch.no_grad():
        got = table_logits(model, images, batch)
        want = reference_logits(model, images, sets, index)
        assert torch.equal(got, want)
        for b, t in enumerate(index):
            c = sets[t].num_classes
            alone = table_logits(model, images[b : b + 1], table.gather([slots[t]]))[0]
            assert alone.shape == (c,)
            assert (got[b, :c] - alone).abs().max() <= TOL, sets[t].task_id
            assert torch.all(got[b, c:] == 0)  # padding


def test_masks_only_when_padded(backbone: Backbone) -> None:
    table = PromptTable(backbone.info)
    a = table.insert(make_set(backbone, "a", P=3, T=2, C=4, seed=1))
    b = table.insert(make_set(backbone, "b", P=3, T=2, C=9, seed=2))
    c = table.insert(make_set(backbone, "c", P=1, T=2, C=2, seed=3))
    same = table.gather([a, b, a])
    assert same.prompts.visual_valid is None and same.prompts.kv_valid is None  # nothing padded: no mask
    mixed = table.gather([a, c])
    assert mixed.prompts.visual_valid is not None and mixed.prompts.visual_valid.tolist() == [
        [True, True, True],
        [True, False, False],
    ]
    assert mixed.prompts.kv_valid is None  # T is the same


def test_serving_dtype_for_visual_kv_and_heads(backbone: Backbone) -> None:
    table = PromptTable(backbone.info, dtype=torch.bfloat16)
    ps = make_set(backbone, "a", P=2, T=3, C=4, share_kv=False, seed=1)
    batch = table.gather([table.insert(ps)])
    assert batch.prompts.visual.dtype == batch.prompts.kv.dtype == torch.bfloat16
    assert torch.equal(batch.prompts.kv[0], ps.kv.to(torch.bfloat16))
    feats = torch.randn(1, backbone.info.embed_dim)
    assert batch.logits(feats).dtype == torch.bfloat16


def test_task_batch_takes_the_backbones_dtype(backbone: Backbone) -> None:
    """A half-precision backbone fed a TaskBatch built without dtype= (float32 prompts) runs, KV included."""
    bb = tiny_backbone(dtype=torch.bfloat16)
    model = PromptedViT(bb).eval()
    ps = make_set(backbone, "a", P=2, T=3, C=4, seed=1)
    tasks = TaskBatch.from_prompt_sets([replace(ps, fingerprint=bb.info.fingerprint)])
    assert tasks.kv.dtype == torch.float32
    with torch.no_grad():
        out = model.forward_multi(images_for(bb, 2).to(torch.bfloat16), tasks, torch.tensor([0, 0]))
    assert out.shape == (2, 4) and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------- heads
def test_large_class_count_heads_without_a_batch_by_classes_by_width_tensor(backbone: Backbone) -> None:
    C, D, B = 100_000, backbone.info.embed_dim, 8
    table = PromptTable(backbone.info)
    big = make_set(backbone, "big", P=2, T=1, C=3, seed=1)
    g = torch.Generator().manual_seed(2)
    big = replace(big, head_weight=torch.randn(C, D, generator=g), head_bias=torch.randn(C, generator=g))
    small = [make_set(backbone, f"s{i}", P=2, T=1, C=3 + i, seed=10 + i) for i in range(3)]
    sets = [big, *small]
    slots = [table.insert(ps) for ps in sets]
    index = [0, 1, 0, 2, 3, 1, 0, 3]
    feats = torch.randn(B, D, generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        batch = table.gather([slots[i] for i in index])
        logits = batch.logits(feats)
    assert logits.shape == (B, C)
    assert len(batch._groups) == 1  # the large head is applied on its rows in place, never copied
    for b, t in enumerate(index):
        ps = sets[t]
        want = feats[b] @ ps.head_weight.T + ps.head_bias
        assert (logits[b, : ps.num_classes] - want).abs().max() <= 1e-3
        assert torch.all(logits[b, ps.num_classes :] == 0)
    # the largest allocation is of the padded logits' size [B, C] (its int64 column index: 8 bytes an
    # entry), nowhere near B * C * D (or even C * D) floats
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= B * C * 8 * 1.01
    assert largest < C * D * 4 / 4  # not even one copy of the large head


@pytest.mark.parametrize(("separate_rows", "packed", "groups"), [(9, 3, 2), (1, 0, 5)])
def test_heads_on_their_own_rows_equal_one_matmul(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch, separate_rows: int, packed: int, groups: int
) -> None:
    """Tasks with many classes get their own matmul on their rows: the same logits as one packed matmul."""
    table = PromptTable(backbone.info)
    sets = [make_set(backbone, f"t{i}", P=1, T=1, C=2 + 3 * i, seed=i) for i in range(5)]  # C 2..14
    slots = [table.insert(ps) for ps in sets]
    index = [4, 0, 1, 4, 2, 3, 0]
    feats = torch.randn(len(index), backbone.info.embed_dim)
    batch = table.gather([slots[i] for i in index])
    assert batch._packed is not None and not batch._groups
    one = batch.logits(feats, fill=-1.0)
    monkeypatch.setattr(table_module, "SEPARATE_HEAD_ROWS", separate_rows)
    batch = table.gather([slots[i] for i in index])
    assert len(batch._groups) == groups and (batch._packed is None) == (packed == 0)
    mixed = batch.logits(feats, fill=-1.0)
    torch.testing.assert_close(mixed, one, rtol=1e-6, atol=1e-5)  # float32 sums in another order
    assert torch.equal(one == -1.0, mixed == -1.0)


# ---------------------------------------------------------------------- rows, reuse, growth
def test_rows_are_reused_only_when_unreferenced_and_compaction_keeps_contents(
    model: PromptedViT, backbone: Backbone
) -> None:
    table = PromptTable(backbone.info, max_bytes=1)  # every growth is past the budget: tight pools
    sets = [make_set(backbone, f"t{i}", P=1 + i % 4, T=i % 3, C=2 + i % 5, seed=i) for i in range(12)]
    slots: list = [table.insert(ps) for ps in sets]
    assert table.live_slots == 12
    held = slots[3]
    for i in range(0, 12, 2):  # free every other task: fragmented pools
        slots[i] = None
    assert table.live_slots == 6
    allocated = table.allocated_bytes
    big = make_set(backbone, "big", P=9, T=4, C=30, seed=99)  # needs compaction (or growth)
    big_slot = table.insert(big)
    assert table.compactions >= 1
    assert table.allocated_bytes <= allocated + table.nbytes_for(big)
    live = [(sets[i], slots[i]) for i in range(1, 12, 2)] + [(big, big_slot)]
    images = images_for(backbone, len(live), seed=1)
    with torch.no_grad():
        got = table_logits(model, images, table.gather([s for _, s in live]))
        want = reference_logits(model, images, [ps for ps, _ in live], list(range(len(live))))
    assert (got - want).abs().max() <= TOL
    del got, want
    assert held is slots[3] and table.live_slots == 7


# ---------------------------------------------------------------------- through the cache (real Redis)
class CountingStore(PromptStore):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gets = 0

    def get(self, task_id: str, version: int | None = None):  # type: ignore[override]
        self.gets += 1
        return super().get(task_id, version)


def test_update_and_delete_between_batches(
    model: PromptedViT, backbone: Backbone, store: PromptStore
) -> None:
    v1 = make_set(backbone, "a", P=3, T=2, C=4, seed=1)
    v2 = make_set(backbone, "a", P=5, T=1, C=6, seed=2)  # other shapes too
    other = make_set(backbone, "o", P=2, T=2, C=3, seed=3)
    store.register(v1)
    store.register(other)
    cache = PromptCache(store, version_check_ms=-1)  # events only
    cache.start()
    images = images_for(backbone, 2, seed=4)
    try:
        in_flight = cache.get_many(["a", "o"])  # a batch resolved its tasks: it holds their rows
        store.register(v2)
        assert wait_for(lambda: cache.resident().get("a") == 2)
        for i in range(20):  # churn: rows freed by others are reused, the held ones are not
            store.register(make_set(backbone, f"x{i}", P=4, T=2, C=5, seed=100 + i))
            cache.get(f"x{i}")
        old = [in_flight["a"], in_flight["o"]]
        assert old[0].version == 1
        with torch.no_grad():
            got = table_logits(model, images, cache.table.gather([e.slot for e in old]))
            assert (got - reference_logits(model, images, [v1, other], [0, 1])).abs().max() <= TOL
            new = [cache.get("a"), cache.get("o")]
            assert new[0].version == 2 and new[0].labels == v2.labels
            got = table_logits(model, images, cache.table.gather([e.slot for e in new]))
            assert (got - reference_logits(model, images, [v2, other], [0, 1])).abs().max() <= TOL
        store.delete("a")
        assert wait_for(lambda: "a" not in cache.resident())
        with pytest.raises(TaskNotFound):
            cache.get("a")
        # the old versions' rows go back once the batches holding them are gone
        live = cache.table.live_slots
        del in_flight, old, new
        assert cache.table.live_slots == live - 2
        assert cache.table.live_slots == len(cache.resident())
    finally:
        cache.close()


def test_concurrent_updates_never_show_half_a_task(
    model: PromptedViT, backbone: Backbone, store: PromptStore
) -> None:
    """Batches run while another thread keeps replacing the task: every batch equals one whole version."""
    versions = [make_set(backbone, "a", P=2 + v % 3, T=1 + v % 2, C=3 + v % 4, seed=v) for v in range(6)]
    store.register(versions[0])
    cache = PromptCache(store, version_check_ms=0)
    images = images_for(backbone, 2, seed=2)
    with torch.no_grad():
        expected = [reference_logits(model, images, [ps], [0, 0]) for ps in versions]
    stop = threading.Event()

    def updater() -> None:
        for ps in versions[1:]:
            store.register(ps)
            cache.check_versions()
        stop.set()

    thread = threading.Thread(target=updater)
    thread.start()
    seen = set()
    try:
        while not stop.is_set() or not seen:
            entry = cache.get("a")
            with torch.no_grad():
                got = table_logits(model, images, cache.table.gather([entry.slot, entry.slot]))
            want = expected[entry.version - 1]
            assert got.shape == want.shape and (got - want).abs().max() <= TOL, entry.version
            seen.add(entry.version)
    finally:
        thread.join()
    assert cache.get("a").version == len(versions)


def test_thousands_of_tasks_with_a_small_cache_keep_serving(model: PromptedViT, backbone: Backbone) -> None:
    """3,000 registered tasks, a budget for about 60: misses load and evict, hits never touch Redis, memory
    stays within the budget, every batch equals the TaskBatch path."""
    import os
    import uuid

    n_tasks = 3000
    store = CountingStore(
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        backbone.info,
        namespace=f"test-{uuid.uuid4().hex[:12]}",
    )
    try:
        sets = {}
        for i in range(n_tasks):
            ps = make_set(backbone, f"t{i:04d}", P=1 + i % 4, T=i % 3, C=2 + i % 7, seed=i)
            sets[ps.task_id] = ps
            store.register(ps)
        one = PromptTable(backbone.info).nbytes_for(sets["t0003"])
        budget = 60 * one
        cache = PromptCache(store, max_bytes=budget, version_check_ms=-1)
        ids = list(sets)
        rng = random.Random(0)
        hot = ids[:8]
        images = images_for(backbone, 16, seed=3)
        cache.get_many(hot)
        for step in range(40):
            batch_ids = [rng.choice(hot) if k % 2 else rng.choice(ids) for k in range(16)]
            resolved = cache.get_many(batch_ids)
            entries = [resolved[t] for t in batch_ids]
            distinct = list(dict.fromkeys(batch_ids))
            with torch.no_grad():
                got = table_logits(model, images, cache.table.gather([e.slot for e in entries]))  # type: ignore[union-attr]
                want = reference_logits(
                    model, images, [sets[t] for t in distinct], [distinct.index(t) for t in batch_ids]
                )
            assert (got - want).abs().max() <= TOL, step
            assert cache.resident_bytes <= budget
            # hot tasks stay resident: a batch of them fetches nothing
            gets = store.gets
            cache.get_many(hot)
            assert store.gets == gets, step
        assert cache.stats.evictions > 100 and cache.stats.misses > 200
        del resolved, entries
        assert cache.table.live_slots == len(cache.resident())
        # the pools stay near the budget: at most a growth chunk of slack each
        assert cache.table.allocated_bytes <= budget + 3 * cache.table.chunk_bytes
    finally:
        store.drop_all()
        store.close()


def test_engine_serves_a_large_head_among_small_ones(backbone: Backbone, store: PromptStore) -> None:
    """Through the engine and Redis: a task with more classes than SEPARATE_HEAD_ROWS batched with small
    tasks answers exactly as the offline model alone."""
    from e2vpt.config import Settings
    from e2vpt.dev.images import image_bytes
    from e2vpt.serving.engine import MultiTaskEngine, RequestItem, Result
    from tests.serving_helpers import offline_predict

    C = table_module.SEPARATE_HEAD_ROWS + 100
    g = torch.Generator().manual_seed(4)
    big = PromptSet.create("big", backbone.info, [f"b{i}" for i in range(C)], generator=g)
    big = replace(big, head_weight=torch.randn(C, backbone.info.embed_dim, generator=g) * 0.05)
    sets = {
        "big": big,
        **{f"s{i}": make_set(backbone, f"s{i}", P=1 + i, T=i, C=3 + i, seed=i) for i in range(3)},
    }
    for ps in sets.values():
        store.register(ps)
    engine = MultiTaskEngine(backbone, store, Settings(cache_version_check_ms=-1))
    try:
        tasks = ["s0", "big", "s1", "big", "s2", "s0"]
        images = [image_bytes(20 + i, (40, 36)) for i in range(len(tasks))]
        out = engine.predict([RequestItem(t, im, top_k=4) for t, im in zip(tasks, images, strict=True)])
        for t, im, res in zip(tasks, images, out, strict=True):
            assert isinstance(res, Result) and res.task_id == t
            expected = offline_predict(backbone, sets[t], im, 4)
            assert [p.label for p in res.predictions] == [label for label, _ in expected]
            assert [p.score for p in res.predictions] == pytest.approx([s for _, s in expected], abs=1e-5)
    finally:
        engine.close()


# ---------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_table_on_cuda_equals_the_cpu_path_without_synchronising() -> None:
    """On the GPU: gathered batches equal the TaskBatch path, and assembling a batch and applying its heads
    never synchronises with the host (torch's sync debug mode raises on any synchronisation)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bb = tiny_backbone()
    bb.model.cuda()
    model = PromptedViT(bb).eval()
    sets = [compacted(ps) for ps in mixed_sets(bb)]
    big = make_set(bb, "big", P=2, T=1, C=3, seed=1)
    g = torch.Generator().manual_seed(2)
    C = table_module.SEPARATE_HEAD_ROWS + 5  # applied on its own rows
    big = replace(big, head_weight=torch.randn(C, bb.info.embed_dim, generator=g), head_bias=torch.randn(C))
    sets.append(big)
    table = PromptTable(bb.info, device="cuda")
    slots = [table.insert(ps) for ps in sets]
    index = [len(sets) - 1, *range(len(sets)), 0, 3]
    images = images_for(bb, len(index), seed=5).cuda()
    feats = torch.randn(len(index), bb.info.embed_dim, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = table.gather([slots[i] for i in index])
        batch.logits(feats)
        table.gather([slots[2]] * 3).logits(feats[:3])  # one task
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        got = table_logits(model, images, batch)
        tasks = TaskBatch.from_prompt_sets(sets, device="cuda")
        want = model.forward_multi(images, tasks, torch.tensor(index, device="cuda"))
    assert (got - want).abs().max().item() <= TOL


def test_table_written_in_and_out_of_inference_mode(backbone: Backbone) -> None:
    """Pools stay normal tensors: a table made or grown under inference mode is written outside it too."""
    with torch.inference_mode():
        table = PromptTable(backbone.info)
        a = table.insert(make_set(backbone, "a", P=2, T=1, C=3, seed=1))
    b = table.insert(make_set(backbone, "b", P=3, T=2, C=4, seed=2))
    with torch.inference_mode():
        c = table.insert(make_set(backbone, "c", P=40, T=9, C=300, seed=3))  # grows the pools
    d = table.insert(make_set(backbone, "d", P=1, T=1, C=2, seed=4))
    batch = table.gather([a, b, c, d])
    assert batch.prompts.visual.shape[:3] == (4, backbone.info.depth, 40)
