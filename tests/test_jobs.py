"""The SQLite job store: idempotent create, priority order, conditional updates, several processes, leases."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from longtake.cluster import jobs
from longtake.cluster.jobs import Conflict, JobStore, Lease, QueueFull, new_runner_id


def test_create_get_list_and_idempotency(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    a, created = store.create({"prompt": "a"}, idempotency_key="k1")
    again, created_again = store.create({"prompt": "a"}, idempotency_key="k1")
    assert created and not created_again and again.id == a.id and again.request == {"prompt": "a"}
    with pytest.raises(Conflict, match=f"'k1' was used for job {a.id} with a different request"):
        store.create({"prompt": "different"}, idempotency_key="k1")
    assert store.get_by_key("k1").id == a.id and store.get_by_key("k2") is None
    b, _ = store.create({"prompt": "b"})
    assert store.get(a.id).state == "queued" and store.get("nope") is None
    assert {j.id for j in store.list()} == {a.id, b.id}
    assert [j.id for j in store.list(limit=1, offset=0)] != [j.id for j in store.list(limit=1, offset=1)]
    assert store.count(("queued",)) == 2


@pytest.mark.parametrize("kw", [{"offset": 59917355663370183770112}, {"limit": 2**63}, {"offset": -1}])
def test_list_refuses_integers_sqlite_cannot_hold(tmp_path, kw):
    store = JobStore(tmp_path / "jobs.db")
    with pytest.raises(ValueError, match=f"{next(iter(kw))}: got"):
        store.list(**kw)


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
        store.create({"i": i % 5}, idempotency_key=f"{key_prefix}{i % 5}")


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


def test_queue_limit_and_insert_are_one_transaction(tmp_path):
    """Many threads submit at once against a limit of 3: exactly 3 get in (a check before the insert lets
    several through)."""
    store = JobStore(tmp_path / "jobs.db")
    outcomes = []

    def submit(i):
        try:
            outcomes.append(store.create({"i": i}, max_active=3)[1])
        except QueueFull:
            outcomes.append("full")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(True) == 3 and outcomes.count("full") == 9 and store.count() == 3


def test_connections_are_closed_after_every_operation(tmp_path, monkeypatch):
    opened = []
    real = sqlite3.connect

    def connect(*args, **kw):
        opened.append(real(*args, **kw))
        return opened[-1]

    monkeypatch.setattr(jobs.sqlite3, "connect", connect)
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({"a": 1})
    store.claim_next("r")
    store.update(job.id, progress={"step": 1})
    store.list(), store.count(), store.get(job.id)
    assert len(opened) >= 6
    for db in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")


def test_a_runner_whose_lease_was_taken_over_can_change_nothing(tmp_path):
    """Runner A's heartbeat stopped; after lease_s runner B requeues and claims the job. A's late `done`,
    `failed`, progress and heartbeat all fail: one runner finishes a job, never two."""
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({"prompt": "x"})
    a, b = new_runner_id(), new_runner_id()
    first = store.claim_next(a)
    assert store.recover(b, lease_s=60) == []  # A's lease is fresh
    time.sleep(0.3)
    assert store.recover(b, lease_s=0.2) == [(job.id, a)]
    second = store.claim_next(b)
    assert second.lease == first.lease + 1 and second.runner == b
    assert not store.update(job.id, state="done", only_from=("running",), owner=(a, first.lease))
    assert not store.update(job.id, progress={"step": 9}, only_from=("running",), owner=(a, first.lease))
    assert not store.heartbeat(job.id, (a, first.lease))
    assert store.heartbeat(job.id, (b, second.lease))
    assert store.update(job.id, state="done", only_from=("running",), owner=(b, second.lease))
    assert store.get(job.id).state == "done"


def runner_id_of(pid: int, **parts) -> str:
    """A runner id of this host, boot and pid namespace for `pid`; `parts` (boot, pidns) replace those."""
    host, _, token, boot, pidns = new_runner_id().split(":")
    return ":".join([host, str(pid), token, parts.get("boot", boot), parts.get("pidns", pidns)])


def dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_a_reused_pid_does_not_keep_a_dead_runners_job(tmp_path):
    """The owner's pid is alive on this host (reused by another process: here, this test itself), but the
    owner stopped renewing its lease: the job is requeued after lease_s."""
    import os

    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({"prompt": "x"})
    owner = runner_id_of(os.getpid())
    store.claim_next(owner)
    time.sleep(0.3)
    assert store.recover(new_runner_id(), lease_s=0.2) == [(job.id, owner)]
    assert store.get(job.id).state == "queued"


def test_a_dead_process_on_this_host_loses_its_job_at_once(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({"prompt": "x"})
    store.claim_next(runner_id_of(dead_pid()))
    assert [j for j, _ in store.recover(new_runner_id(), lease_s=3600)] == [job.id]


def test_runner_ids_name_the_boot_and_pid_namespace():
    import os
    import socket

    host, pid, token, boot, pidns = new_runner_id("serve-").split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid())) and token.startswith("serve-")
    assert boot == open("/proc/sys/kernel/random/boot_id").read().strip().replace("-", "")[:12]
    assert pidns == os.readlink("/proc/self/ns/pid")[5:-1]
    assert new_runner_id() != new_runner_id()  # a random instance id: two runners of one process differ


@pytest.mark.parametrize("other", [
    {"pidns": "4026539999"},  # another container on this host: its pid 123 is not this namespace's pid 123
    {"boot": "0123456789ab"},  # this host before a reboot
    "legacy",  # host:pid:token, written by an older runner: it carries neither
])
def test_a_pid_of_another_namespace_or_boot_is_judged_by_its_lease_only(tmp_path, other):
    """Pods share a host name and have their own pid namespaces: a live runner in another pod whose pid does
    not exist here must keep its job while its lease is fresh, and lose it once the lease expires."""
    store = JobStore(tmp_path / "jobs.db")
    job, _ = store.create({"prompt": "x"})
    pid = dead_pid()
    owner = ":".join(runner_id_of(pid).split(":")[:3]) if other == "legacy" else runner_id_of(pid, **other)
    store.claim_next(owner)
    assert store.recover(new_runner_id(), lease_s=3600) == []  # the lease is fresh: the runner may be alive
    assert store.get(job.id).state == "running"
    time.sleep(0.3)
    assert store.recover(new_runner_id(), lease_s=0.2) == [(job.id, owner)]


class FailingStore(JobStore):
    """The heartbeat's SQLite write fails (a locked or lost database)."""

    def heartbeat(self, job_id, owner):
        raise sqlite3.OperationalError("database is locked")


def test_a_lease_whose_heartbeat_keeps_failing_is_lost(tmp_path, caplog):
    store = FailingStore(tmp_path / "jobs.db")
    job, _ = store.create({})
    claimed = store.claim_next("me")
    with Lease(store, job.id, ("me", claimed.lease), lease_s=0.4) as lease:
        assert lease.lost.wait(5), "the lease should be lost when heartbeats fail for half the lease"
    assert "no heartbeat" in lease.reason and "database is locked" in caplog.text
    taken = JobStore(tmp_path / "jobs.db")
    taken.update(job.id, state="queued", only_from=("running",))
    with Lease(JobStore(tmp_path / "jobs.db"), job.id, ("me", claimed.lease), lease_s=0.4) as lease:
        assert lease.lost.wait(5) and "requeued or taken over" in lease.reason


MOUNTINFO = r"""22 1 0:21 / /proc rw,relatime - proc proc rw
29 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
40 29 0:45 / /data rw,relatime shared:20 - nfs4 fs.example:/export rw,vers=4.2
41 40 259:2 / /data/local rw,relatime - xfs /dev/nvme1n1 rw
42 29 0:50 / /mnt/my\040share rw,relatime - cifs //nas/share rw
43 29 0:51 / /srv/bucket rw,nosuid - fuse.gcsfuse bucket rw,user_id=0
44 29 0:52 / /srv/overlay rw - fuse.fuse-overlayfs fuse-overlayfs rw
45 29 0:53 / /srv rw - 9p hostshare rw
46 45 0:54 / /srv rw - ext4 /dev/sdb rw
"""


@pytest.mark.parametrize("path, kind", [
    ("/home/me/farm/farm.db", "ext4"),
    ("/data/longtake/jobs.db", "nfs4"),
    ("/data", "nfs4"),
    ("/database/x.db", "ext4"),  # /data is not a prefix of /database
    ("/data/local/farm.db", "xfs"),  # a local disk mounted inside the network one
    ("/mnt/my share/farm.db", "cifs"),  # \040 in mountinfo is a space
    ("/srv/bucket/farm.db", "fuse.gcsfuse"),
    ("/srv/overlay/farm.db", "fuse.fuse-overlayfs"),
    ("/srv/other/farm.db", "ext4"),  # two mounts on /srv: the later one hides the 9p share
])
def test_mount_type_reads_mountinfo(path, kind):
    assert jobs.mount_type(path, MOUNTINFO) == kind


def test_a_store_on_a_network_filesystem_uses_a_rollback_journal(tmp_path, monkeypatch, caplog):
    local = JobStore(tmp_path / "local" / "jobs.db")  # this machine's disk: WAL
    with local._db() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # the same directory, as mountinfo would show it on an NFS mount
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"29 1 259:1 / / rw - ext4 /dev/sda1 rw\n"
                         f"40 29 0:45 / {tmp_path.resolve()}/nfs rw - nfs4 server:/export rw,vers=4.2\n")
    monkeypatch.setattr(jobs, "MOUNTINFO", str(mountinfo))
    store = JobStore(tmp_path / "nfs" / "farm.db")
    with store._db() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert f"job store {tmp_path / 'nfs' / 'farm.db'} is on a network filesystem (nfs4)" in caplog.text
    job, _ = store.create({"prompt": "x"})  # and it works
    assert store.claim_next("r").id == job.id
    assert not (tmp_path / "nfs" / "farm.db-wal").exists()
