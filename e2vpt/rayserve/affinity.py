"""Task affinity by rendezvous (highest random weight) hashing: pure functions, no Ray.

Every (task, replica) pair gets a pseudo-random weight; a task's replicas ranked by weight give its owner
(first) and backup (second). Only the replicas present decide, so when a replica joins it takes the tasks
for which it now weighs most (about 1/N of them, N the new count) and no other task moves; when one leaves,
only its own tasks move, each to its backup. Affinity is for cache hits and cold-load latency, never
correctness: every replica can answer every task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


def weight(task_id: str, replica_id: str) -> int:
    """The pair's rendezvous weight: 64 bits of blake2b over both ids (stable across processes)."""
    digest = hashlib.blake2b(f"{task_id}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(task_id: str, replicas: Iterable[str]) -> list[str]:
    """The replicas in the task's order of preference: owner first, then backup, then the rest."""
    return sorted(set(replicas), key=lambda r: (weight(task_id, r), r), reverse=True)


def owner_and_backup(task_id: str, replicas: Iterable[str]) -> tuple[str | None, str | None]:
    order = ranked(task_id, replicas)
    return (order[0] if order else None), (order[1] if len(order) > 1 else None)


def assignment(task_ids: Iterable[str], replicas: Iterable[str]) -> dict[str, str | None]:
    """task id -> owner replica."""
    live = list(set(replicas))
    return {t: owner_and_backup(t, live)[0] for t in task_ids}


def preference(
    task_id: str, replicas: Iterable[str], queue_lens: Mapping[str, int], overload: int
) -> list[list[str]]:
    """The routing ranks for one request: [owner] unless it is overloaded (its known queue length is at
    least `overload`), then [backup] likewise, then every replica (the least loaded wins). A replica whose
    queue length is unknown counts as not overloaded."""
    order = ranked(task_id, replicas)
    ranks = [[r] for r in order[:2] if queue_lens.get(r, 0) < overload]
    if order:
        ranks.append(order)
    return ranks
