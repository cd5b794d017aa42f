"""`PromptTable`: the device-resident prompts and heads of every cached task, and batch assembly from them.

Storage: three row pools on the serving device, each a set of preallocated tensors sharing one row axis:

    visual  visual [L, N_v, D]               one row per visual prompt token
    kv      kv     [L, 2, H, N_k, Dh]        one row per KV prompt token (tied K/V stored as both)
    heads   weight [N_h, D], bias [N_h]      one row per class

A task holds one contiguous range of rows in each pool: its `TableSlot`. Row 0 of `visual` and `kv` is a
permanent zero row, the padding of shorter tasks.

Assembly (`gather`): every image's (first row, count) in each pool is known on the host, so every index
of the batch (rows per image padded to the batch's own largest P and T, head rows and columns, validity
masks) is computed there with numpy and sent as one buffer; on the device a batch costs one copy and an
index gather per pool (about 15 tensor operations whatever B, against 37-43 when the indices were
computed on the device). Heads: the rows of the batch's distinct tasks, one matmul, then each image
gathers its own columns (`e2vpt.core.model.head_logits`): never a [batch, largest class count, D]
tensor. No per-task copy, no allocation but the outputs, no device-to-host synchronisation.

Consistency: a slot's rows never change while the slot is referenced. A new version gets new rows (the
cache then swaps its mapping); the rows of a replaced, deleted or evicted slot return to the free list only
once nothing references the slot (a batch that resolved it holds it until it has run), so no batch ever
sees half of a task or another task's rows. Compaction moves rows but not their contents, under the lock
that `gather` holds.

Memory: pools grow in chunks (half their size, at least what is asked) while the whole table stays within
`max_bytes`; past it only by what a task needs (the cache evicts before inserting, so that happens only
while pinned or in-flight tasks hold the rows). A fragmented pool is compacted before it grows, and pools
with much free room are shrunk (compacted into a smaller tensor) when another needs the budget.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from e2vpt.core.backbone import BackboneInfo
from e2vpt.core.model import PromptInputs, head_logits
from e2vpt.core.promptset import PromptSet

VISUAL, KV, HEADS = 0, 1, 2
# A pool grows by at least a chunk (or what is asked, if more): MIN_CHUNK_BYTES, or an eighth of the budget
# if that is less; pools shrink to their rows plus one chunk when another needs the budget.
MIN_CHUNK_BYTES = 1 << 20
# Heads of a batch: one matmul over the (gathered) rows of its distinct tasks, [B, R] scores. A task with at
# least SEPARATE_HEAD_ROWS classes gets its own matmul on its rows in place (no copy of a large head), and so
# does every task when the [B, R] scores would be both larger than GROUPED_HEADS_MIN_ELEMENTS and 4x the
# padded logits [B, C_max].
SEPARATE_HEAD_ROWS = 4096
GROUPED_HEADS_MIN_ELEMENTS = 1 << 26


@dataclass(eq=False)
class _Rows:
    """One slot's ranges: first row per pool (moved by compaction) and row count per pool."""

    first: list[int]
    count: list[int]


class TableSlot:
    """A task's rows in a `PromptTable`. They stay valid and unchanged as long as this object is referenced;
    once it is not (and the cache no longer maps a task to it), the rows are reused."""

    __slots__ = ("__weakref__", "_rows", "nbytes", "num_classes", "num_kv", "num_prompts")

    def __init__(self, rows: _Rows, nbytes: int) -> None:
        self._rows = rows
        self.num_prompts, self.num_kv, self.num_classes = rows.count
        self.nbytes = nbytes


class _Pool:
    """Tensors sharing one row axis (capacity rows), with first-fit allocation of contiguous ranges."""

    def __init__(
        self,
        shapes: dict[str, tuple[int | None, ...]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        reserved: int,
    ) -> None:
        self.shapes = shapes  # None marks the row axis
        self.axes = {k: s.index(None) for k, s in shapes.items()}
        self.device, self.dtype = device, dtype
        self.reserved = reserved  # leading zero rows, never allocated
        elem = torch.empty((), dtype=dtype).element_size()
        self.row_bytes = sum(elem * math.prod(d for d in s if d is not None) for s in shapes.values())
        self.capacity = reserved
        self.tensors = self._empty(reserved)
        self.free: list[list[int]] = []  # sorted [start, length]
        self.used = 0

    def _empty(self, rows: int) -> dict[str, Tensor]:
        return {
            k: torch.zeros([rows if d is None else d for d in s], device=self.device, dtype=self.dtype)
            for k, s in self.shapes.items()
        }

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_bytes

    @property
    def free_rows(self) -> int:
        return self.capacity - self.reserved - self.used

    def rows(self, name: str, first: int, count: int) -> Tensor:
        return self.tensors[name].narrow(self.axes[name], first, count)

    def take(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = [start + n, length - n]
                self.used += n
                return start
        return None

    def give(self, start: int, n: int) -> None:
        self.used -= n
        self._add_free(start, n)

    def _add_free(self, start: int, n: int) -> None:
        free = self.free
        i = 0
        while i < len(free) and free[i][0] < start:
            i += 1
        free.insert(i, [start, n])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:  # merge with the next
            free[i][1] += free.pop(i + 1)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:  # and with the previous
            free[i - 1][1] += free.pop(i)[1]

    def grow(self, capacity: int) -> None:
        """More rows at the end; rows keep their places."""
        new = self._empty(capacity)
        for k, t in self.tensors.items():
            new[k].narrow(self.axes[k], 0, self.capacity).copy_(t)
        self.tensors = new
        self._add_free(self.capacity, capacity - self.capacity)
        self.capacity = capacity

    def repack(self, capacity: int, live: Sequence[_Rows], index: int) -> None:
        """Copy the live ranges to the front of fresh tensors of `capacity` rows (compaction, or a
        shrink), updating their first rows; all free room becomes one range at the end."""
        new = self._empty(capacity)
        at = self.reserved
        for rows in sorted(live, key=lambda r: r.first[index]):
            n = rows.count[index]
            if n == 0:
                continue
            for k, t in self.tensors.items():
                axis = self.axes[k]
                new[k].narrow(axis, at, n).copy_(t.narrow(axis, rows.first[index], n))
            rows.first[index] = at
            at += n
        self.tensors, self.capacity = new, capacity
        self.free = [[at, capacity - at]] if capacity > at else []


class _HeadGroup(NamedTuple):
    """A task whose head is applied on its own rows, in place: no copy of them."""

    images: Tensor  # [n] the images of the task
    weight: Tensor  # [C, D] a view of the pool
    bias: Tensor  # [C]


class TableBatch:
    """One assembled batch: per-image prompt inputs and the heads of its distinct tasks. Holds its slots, so
    that their rows stay put until the batch is dropped.

    Heads: the rows of the batch's tasks packed into one [R, D] weight (gathered; a view when the batch has
    one task) and applied by one matmul (`head_logits`); a task with many classes (or every task, where the
    [B, R] scores would be far larger than the logits) instead by its own matmul on its rows in place."""

    def __init__(
        self,
        prompts: PromptInputs,
        width: int,
        slots: tuple[TableSlot, ...],
        packed: tuple[Tensor, Tensor, Tensor, Tensor, int] | None,
        groups: list[_HeadGroup],
    ) -> None:
        self.prompts = prompts
        self.width = width  # the largest class count of the batch: the logits' width
        self._slots = slots
        # packed tasks: weight [R, D], bias [R], first column per image [B], count per image [B] (0 for
        # the images of separate tasks), their largest count
        self._packed = packed
        self._groups = groups

    def logits(self, feats: Tensor, fill: float = 0.0) -> Tensor:
        """Each image's own head on pooled features [B, D]: logits [B, width], past its class count `fill`."""
        if self._packed is not None:
            weight, bias, first, count, width = self._packed
            if len(self._slots) == 1:  # one task: every image's logits are all of its columns
                out = torch.addmm(bias, feats.to(weight.dtype), weight.t())
            else:
                out = head_logits(feats, weight, bias, first, count, width, fill)
            if width < self.width:
                out = F.pad(out, (0, self.width - width), value=fill)
        else:
            dtype = self._groups[0].weight.dtype
            out = torch.full((feats.shape[0], self.width), fill, dtype=dtype, device=feats.device)
        for group in self._groups:
            x = feats.index_select(0, group.images).to(group.weight.dtype)
            scores = torch.addmm(group.bias, x, group.weight.t())
            out.narrow(1, 0, group.weight.shape[0]).index_copy_(0, group.images, scores)
        return out


class PromptTable:
    """Device-resident prompt sets, assembled into batches by index gathers. Thread-safe."""

    def __init__(
        self,
        info: BackboneInfo,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.info = info
        self.device, self.dtype = torch.device(device), dtype
        self.max_bytes = max_bytes
        self.chunk_bytes = max(1, min(MIN_CHUNK_BYTES, max_bytes // 8))
        L, D, H, Dh = info.depth, info.embed_dim, info.num_heads, info.head_dim
        kw = {"device": self.device, "dtype": dtype}
        with torch.inference_mode(False):
            self._pools = (
                _Pool({"visual": (L, None, D)}, reserved=1, **kw),
                _Pool({"kv": (L, 2, H, None, Dh)}, reserved=1, **kw),
                _Pool({"weight": (None, D), "bias": (None,)}, reserved=0, **kw),
            )
        self._live: set[_Rows] = set()
        # rows of slots no longer referenced: appended by finalizers (any thread), drained under the lock
        self._released: deque[_Rows] = deque()
        self._lock = threading.RLock()
        self.growths = 0
        self.compactions = 0

    # ------------------------------------------------------------------ accounting
    def nbytes_for(self, ps: PromptSet) -> int:
        """What a (compacted) set costs in the table: its rows."""
        v, k, h = self._pools
        return ps.num_prompts * v.row_bytes + ps.num_kv * k.row_bytes + ps.num_classes * h.row_bytes

    @property
    def allocated_bytes(self) -> int:
        """Device memory the pools hold (capacity, free rows included)."""
        return sum(p.nbytes for p in self._pools)

    @property
    def used_bytes(self) -> int:
        """Rows held by slots still referenced (resident or in a batch)."""
        with self._lock:
            self._reclaim()
            return sum(p.used * p.row_bytes for p in self._pools)

    @property
    def live_slots(self) -> int:
        with self._lock:
            self._reclaim()
            return len(self._live)

    # ------------------------------------------------------------------ writing
    @torch.inference_mode(False)  # pools are normal tensors, written in place whoever calls (in any mode)
    def insert(self, ps: PromptSet) -> TableSlot:
        """Copy a compacted, validated set (no token or segment mask) into fresh rows."""
        if ps.is_masked:
            raise ValueError("the prompt table takes compacted sets (PromptSet.compact) without masks")
        counts = (ps.num_prompts, ps.num_kv, ps.num_classes)
        with self._lock:
            self._reclaim()
            rows = _Rows([0, 0, 0], [0, 0, 0])  # live while placed pool by pool (compaction moves it too)
            self._live.add(rows)
            try:
                for i, n in enumerate(counts):
                    rows.first[i] = self._place(i, n)
                    rows.count[i] = n
                v, k, h = self._pools
                p, t, c = counts
                if p:
                    v.rows("visual", rows.first[VISUAL], p).copy_(ps.visual)
                if t:
                    k.rows("kv", rows.first[KV], t).copy_(ps.kv_pair())
                h.rows("weight", rows.first[HEADS], c).copy_(ps.head_weight)
                h.rows("bias", rows.first[HEADS], c).copy_(ps.head_bias)
            except BaseException:  # e.g. out of device memory: give back what was placed
                self._released.append(rows)
                self._reclaim()
                raise
        slot = TableSlot(rows, self.nbytes_for(ps))
        finalizer = weakref.finalize(slot, self._released.append, rows)
        finalizer.atexit = False
        return slot

    def _reclaim(self) -> None:
        while self._released:
            rows = self._released.popleft()
            self._live.discard(rows)
            for pool, first, n in zip(self._pools, rows.first, rows.count, strict=True):
                if n:
                    pool.give(first, n)

    def _place(self, index: int, n: int) -> int:
        if n == 0:
            return 0
        pool = self._pools[index]
        start = pool.take(n)
        if start is None and pool.free_rows >= n:  # fragmented: compact in place of growing
            pool.repack(pool.capacity, list(self._live), index)
            self.compactions += 1
            start = pool.take(n)
        if start is None:
            self._grow(index, n)
            start = pool.take(n)
        assert start is not None
        return start

    def _grow(self, index: int, n: int) -> None:
        pool = self._pools[index]
        others = sum(p.nbytes for j, p in enumerate(self._pools) if j != index)
        if (pool.capacity + n) * pool.row_bytes + others > self.max_bytes:
            others = self._shrink_others(index)
        chunk = max(n, pool.capacity // 2, -(-self.chunk_bytes // pool.row_bytes))
        within_budget = (self.max_bytes - others) // pool.row_bytes
        pool.grow(min(pool.capacity + chunk, max(pool.capacity + n, within_budget)))
        self.growths += 1

    def _shrink_others(self, index: int) -> int:
        """Give budget back: pools other than `index` with free room beyond a chunk are compacted to their
        used rows plus one chunk. Returns their bytes."""
        for j, pool in enumerate(self._pools):
            slack = -(-self.chunk_bytes // pool.row_bytes)
            if j != index and pool.free_rows > slack:
                pool.repack(pool.reserved + pool.used + slack, list(self._live), j)
                self.compactions += 1
        return sum(p.nbytes for j, p in enumerate(self._pools) if j != index)

    # ------------------------------------------------------------------ assembly
    def gather(self, slots: Sequence[TableSlot]) -> TableBatch:
        """The batch of images whose tasks are `slots` (one per image, repeated for images of one task)."""
        if not slots:
            raise ValueError("a batch needs at least one image")
        B = len(slots)
        distinct: dict[int, int] = {}
        order: list[TableSlot] = []
        for s in slots:
            if id(s) not in distinct:
                distinct[id(s)] = len(order)
                order.append(s)
        task = [distinct[id(s)] for s in slots]
        counts = [s._rows.count for s in order]
        p_u, t_u, c_u = (list(c) for c in zip(*counts, strict=True))
        P, T, width = max(p_u), max(t_u), max(c_u)
        pad_p, pad_t = P != min(p_u), T != min(t_u)  # shorter tasks in the batch: masks needed
        U = len(order)
        # heads: which tasks get their own matmul (rows used in place), which are packed into one
        separate = [U > 1 and c >= SEPARATE_HEAD_ROWS for c in c_u]
        if B * sum(c for c, sep in zip(c_u, separate, strict=True) if not sep) > max(
            4 * B * width, GROUPED_HEADS_MIN_ELEMENTS
        ):
            separate = [True] * U
        packed = [u for u in range(U) if not separate[u]]
        packed_u = np.array([0 if sep else c for c, sep in zip(c_u, separate, strict=True)], dtype=np.int64)
        col_u = np.cumsum(packed_u) - packed_u  # first column of a packed task in the [B, R] scores
        R = int(packed_u.sum())
        t = np.asarray(task)
        n_images = np.bincount(t, minlength=U)
        by_task = np.argsort(t, kind="stable")  # images grouped by task
        with self._lock:
            firsts = [s._rows.first for s in order]
            # every index of the batch is computed here on the host and sent as one buffer (int64 indices,
            # then the bytes of the bool masks): one copy to the device, then gathers, no index arithmetic
            first_u, count_u = np.array(firsts, dtype=np.int64), np.array(counts, dtype=np.int64)
            v_idx, v_valid = _row_index(first_u[t, VISUAL], count_u[t, VISUAL], P)
            k_idx, k_valid = _row_index(first_u[t, KV], count_u[t, KV], T)
            # the weight row of packed column j: j + (first row - first column) of its task
            head_rows = (
                np.repeat(first_u[:, HEADS] - col_u, packed_u) + np.arange(R)
                if len(packed) > 1
                else np.zeros(0, dtype=np.int64)  # one packed task: its rows are used in place
            )
            ints = [v_idx, k_idx, col_u[t], packed_u[t], head_rows, by_task]
            masks = [m for m, padded in ((v_valid, pad_p), (k_valid, pad_t)) if padded]
            host = np.concatenate(
                [np.concatenate(ints).view(np.uint8), *(m.ravel().view(np.uint8) for m in masks)]
            )
            meta = torch.from_numpy(host)
            if self.device.type == "cuda":
                meta = meta.pin_memory().to(self.device, non_blocking=True)
            else:
                meta = meta.to(self.device)
            n_int = sum(a.size for a in ints)
            v_at, k_at, h_col, h_count, rows, perm = (
                meta[: 8 * n_int].view(torch.int64).split([a.size for a in ints])
            )
            bools = meta[8 * n_int :].view(torch.bool)
            visual_valid = bools[: B * P].view(B, P) if pad_p else None
            kv_valid = bools[B * P if pad_p else 0 :].view(B, T) if pad_t else None
            v, k, h = self._pools
            L, D, H, Dh = self.info.depth, self.info.embed_dim, self.info.num_heads, self.info.head_dim
            visual = v.tensors["visual"].index_select(1, v_at).view(L, B, P, D).transpose(0, 1)
            kv = k.tensors["kv"].index_select(3, k_at).view(L, 2, H, B, T, Dh).permute(3, 0, 1, 2, 4, 5)
            prompts = PromptInputs(visual, kv, visual_valid, kv_valid)

            weight, bias = h.tensors["weight"], h.tensors["bias"]
            heads = None
            packed_width = max((c_u[u] for u in packed), default=0)
            if len(packed) == 1:  # one task: its rows as they are
                f = firsts[packed[0]][HEADS]
                heads = (weight[f : f + R], bias[f : f + R], h_col, h_count, packed_width)
            elif packed:
                heads = (
                    weight.index_select(0, rows),
                    bias.index_select(0, rows),
                    h_col,
                    h_count,
                    packed_width,
                )
            groups, at = [], 0
            for u, (c, n) in enumerate(zip(c_u, n_images.tolist(), strict=True)):
                if separate[u]:
                    f = firsts[u][HEADS]
                    groups.append(_HeadGroup(perm[at : at + n], weight[f : f + c], bias[f : f + c]))
                at += n
            return TableBatch(prompts, width, tuple(order), heads, groups)


def _row_index(first: np.ndarray, count: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool rows first[b] : first[b] + count[b] for every image b, padded to `width` with row 0 (zeros),
    flattened image-major [B * width]; and the validity mask [B, width] (bool)."""
    cols = np.arange(width)
    valid = cols[None] < count[:, None]
    return np.where(valid, first[:, None] + cols[None], 0).ravel(), valid
