"""The SQLite job store: idempotent create, priority order, conditional updates, several processes."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from longtake.cluster.jobs import JobStore


def test_create_get_list_and_idempotency(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    a, created = store.create({"prompt": "a"}, idempotency_key="k1")
    again, created_again = store.create({"prompt": "different"}, idempotency_key="k1")
    assert created and not created_again and again.id == a.id and again.request == {"prompt": "a"}
    assert store.get_by_key("k1").id == a.id and store.get_by_key("k2") is None
    b, _ = store.create({"prompt": "b"})
    assert store.get(a.id).state == "queued" and store.get("nope") is None
    assert {j.id for j in store.list()} == {a.id, b.id}
    assert [j.id for j in store.list(limit=1, offset=0)] != [j.id for j in store.list(limit=1, offset=1)]
    assert store.count(("queued",)) == 2


def test_claim_by_priority_then_submit_time(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    low, _ = store.create({"n": 1}, priority=0)
    high, _ = store.create({"n": 2}, priority=5)
    low2, _ = store.create({"n": 3}, priority=0)
    assert [store.claim_next().id for _ in range(3)] == [high.id, low.id, low2.id]
    assert store.claim_next() is None
    assert store.get(high.id).state == "running"


def test_conditional_update(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({})
    assert store.update(job.id, state="cancelled", only_from=("queued", "running"))
    assert not store.update(job.id, state="done", only_from=("running",))  # a cancelled job stays cancelled
    assert store.get(job.id).state == "cancelled"
    store.update(job.id, progress={"step": 3, "steps": 10})
    assert store.get(job.id).progress == {"step": 3, "steps": 10}
    with pytest.raises(ValueError, match="state: got 'bogus'"):
        store.update(job.id, state="bogus")


def _submit_many(path, n, key_prefix):
    store = JobStore(path)
    for i in range(n):
        store.create({"i": i}, idempotency_key=f"{key_prefix}{i % 5}")


def test_concurrent_processes_do_not_lose_or_duplicate(tmp_path):
    path = tmp_path / "jobs.db"
    JobStore(path)
    procs = [mp.get_context("spawn").Process(target=_submit_many, args=(path, 20, p)) for p in ("x", "y", "x")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert JobStore(path).count() == 10  # 5 keys per prefix, repeated submits deduplicated
