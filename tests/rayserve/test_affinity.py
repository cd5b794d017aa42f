"""Rendezvous hashing (e2vpt.rayserve.affinity): owner and backup, ~1/N of the tasks move on a join,
only a leaver's tasks move on a leave, overloaded owners spill. Pure functions: no Ray needed."""

from __future__ import annotations

from collections import Counter

from e2vpt.rayserve.affinity import assignment, owner_and_backup, preference, ranked, weight

TASKS = [f"task-{i}" for i in range(3000)]


def test_owner_and_backup_are_distinct_stable_and_order_free() -> None:
    replicas = ["a", "b", "c"]
    for t in TASKS[:200]:
        owner, backup = owner_and_backup(t, replicas)
        assert owner in replicas and backup in replicas and owner != backup
        assert (owner, backup) == owner_and_backup(t, list(reversed(replicas)))
        assert ranked(t, replicas)[:2] == [owner, backup]
    assert owner_and_backup("t", ["only"]) == ("only", None)
    assert owner_and_backup("t", []) == (None, None)
    assert weight("t", "a") == weight("t", "a") != weight("t", "b")


def test_tasks_spread_evenly() -> None:
    counts = Counter(assignment(TASKS, ["a", "b", "c"]).values())
    assert set(counts) == {"a", "b", "c"}
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_a_joining_replica_takes_about_one_nth_and_nothing_else_moves() -> None:
    before = assignment(TASKS, ["a", "b"])
    after = assignment(TASKS, ["a", "b", "c"])
    moved = [t for t in TASKS if before[t] != after[t]]
    assert all(after[t] == "c" for t in moved)  # only to the newcomer
    assert 0.28 <= len(moved) / len(TASKS) <= 0.39, len(moved)


def test_a_leaving_replica_moves_only_its_tasks_each_to_its_backup() -> None:
    live = ["a", "b", "c", "d"]
    before = {t: owner_and_backup(t, live) for t in TASKS}
    after = assignment(TASKS, ["a", "b", "d"])
    for t in TASKS:
        owner, backup = before[t]
        assert after[t] == (backup if owner == "c" else owner)


def test_preference_spills_from_an_overloaded_owner_to_the_backup_then_anyone() -> None:
    replicas = ["a", "b", "c"]
    t = TASKS[0]
    owner, backup = owner_and_backup(t, replicas)
    assert owner is not None and backup is not None
    assert preference(t, replicas, {}, overload=4)[:2] == [[owner], [backup]]
    assert preference(t, replicas, {owner: 4}, overload=4)[0] == [backup]
    ranks = preference(t, replicas, {owner: 9, backup: 5}, overload=4)
    assert len(ranks) == 1 and sorted(ranks[0]) == replicas
    assert preference(t, [], {}, overload=4) == []
