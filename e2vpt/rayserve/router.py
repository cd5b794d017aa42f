"""`TaskAffinityRouter`: Ray Serve's request router for the engine deployment, by task affinity.

Each request's task has an owner replica and a backup among the live replicas (rendezvous hashing,
`e2vpt.rayserve.affinity`). The router offers Ray the owner alone, then the backup alone, each only while
its queue is under `overload` requests, then every replica (Ray picks the least loaded of a rank and skips
full or dead replicas). A replica that leaves takes only its own tasks with it, each to its backup; one
that joins takes about 1/N of the tasks.

The task id is an ordinary argument of the call (`EngineReplica.predict(item)`), never Ray's multiplexed
model id: Ray's `@serve.batch` splits batches by model id, which would throw away mixed-task batches.
Queue lengths come from Ray's own queue-length cache (probes and sends), else from the replicas' routing
stats (`EngineReplica.record_routing_stats`). The router runs in the caller (the ingress replicas); it
counts where requests went in `e2vpt_router_routed{choice=owner|backup|other}`.

Ray Serve's `RequestRouter` is an alpha API (ray 2.60.0); a router cannot be swapped on an existing
handle, so changing `ray_affinity` means deploying the application again.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.metrics import Counter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from e2vpt.rayserve.affinity import owner_and_backup, preference

log = logging.getLogger(__name__)

DEFAULT_OVERLOAD = 48


def task_of(request: PendingRequest | None) -> str | None:
    """The task id of a pending `EngineReplica.predict(item)` call (None: not such a call)."""
    if request is None:
        return None
    item: Any = request.args[0] if request.args else request.kwargs.get("item")
    task_id = getattr(item, "task_id", None)
    return task_id if isinstance(task_id, str) else None


class TaskAffinityRouter(RequestRouter):
    """Owner, then backup, then anyone; see the module docstring."""

    def initialize_state(self, overload: int = DEFAULT_OVERLOAD, **kwargs: Any) -> None:
        self.overload = int(overload)
        self.routed = Counter(
            "e2vpt_router_routed",
            description="Engine requests by where the task-affinity router sent them",
            tag_keys=("choice",),
        )

    def queue_len(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return int(cached)
        stats = replica.routing_stats or {}
        return int(stats.get("queue_len", 0))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # every rank is offered at once: when none accepts, back off before asking again
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        task_id = task_of(pending_request)
        if task_id is None:
            return [candidate_replicas]
        queues = {rid: self.queue_len(r) for rid, r in by_id.items()}
        return [[by_id[rid] for rid in rank] for rank in preference(task_id, by_id, queues, self.overload)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        task_id = task_of(pending_request)
        if task_id is None:
            return
        owner, backup = owner_and_backup(task_id, (r.unique_id for r in self.curr_replicas))
        rid = replica_id.unique_id
        choice = "owner" if rid == owner else "backup" if rid == backup else "other"
        self.routed.inc(tags={"choice": choice})
