"""dedupshm.dask: the StorePlugin on real Dask clusters (LocalCluster with
worker processes, and `dask scheduler` / `dask worker` processes on
loopback, with a second host simulated by DEDUPSHM_DASK_HOST).  Large
values must live once per host, same-host transfers carry references,
other hosts get bytes, the memory monitor must not count shared pages, and
no store file may outlive the workers -- also when they are SIGKILLed."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("distributed")
from distributed import Client, LocalCluster, wait  # noqa: E402

from helpers import MiB, file_bytes, pattern_array, smaps_rollup, wait_for  # noqa: E402
from dedupshm.dask import HOST_ENV, StorePlugin, host_identity, store_name  # noqa: E402

MIN = 1 << 20


@pytest.fixture
def shmdir():
    """A private directory on /dev/shm for the test's stores: every file a
    store of the test leaves is in it."""
    d = f"/dev/shm/dedupshm-t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(d, 0o700)
    try:
        yield d
    finally:
        left = os.listdir(d)
        for f in left:
            os.remove(os.path.join(d, f))
        os.rmdir(d)
        assert not left, f"store files left behind: {left}"


def files(d):
    return sorted(os.listdir(d))


def cluster(n=2, **kw):
    kw.setdefault("memory_limit", "2GiB")
    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                        dashboard_address=None, **kw)


# ---- functions that run on workers

def make(nbytes, seed):
    return pattern_array(nbytes, seed)


def checksum(x):
    return int(np.bitwise_xor.reduce(x.view(np.uint64)))


def worker_view(dask_worker):
    """What a worker holds and did: its values (shared or not), its counters,
    its private memory, its pid."""
    import gc
    from dedupshm import dask as dd
    gc.collect()
    return {"shared": sorted(str(k) for k in dask_worker.data.shared),
            "private": sorted(str(k) for k in dask_worker.data.inner),
            "counts": dict(dd.counts), "pid": os.getpid(),
            "status": dask_worker.status.name}


def store_of(c, d, host=None):
    return store_name(host or host_identity(), c.scheduler.address)


def pool_bytes(d, name):
    return file_bytes(os.path.join(d, f"dedupshm.{name}.pool"))


# ---- LocalCluster

def test_same_host_transfer_is_a_reference(shmdir):
    with cluster() as cl, Client(cl) as c:
        c.register_plugin(StorePlugin(directory=shmdir, min_nbytes=MIN))
        w0, w1 = sorted(c.scheduler_info()["workers"])
        name = store_of(c, shmdir)
        assert files(shmdir) == [f"dedupshm.{name}.index", f"dedupshm.{name}.pool"]
        a = c.submit(make, 32 * MiB, 1, workers=[w0], key="a")
        s = c.submit(checksum, a, workers=[w1], key="s")
        assert s.result() == checksum(make(32 * MiB, 1))
        v = c.run(worker_view)
        assert v[w0]["counts"]["sent_refs"] == 1 and v[w1]["counts"]["received_refs"] == 1
        assert v[w0]["shared"] == ["a"] and v[w1]["shared"] == ["a"]
        # one copy on the host (plus the store's index)
        assert 32 * MiB <= pool_bytes(shmdir, name) < 33 * MiB
        # the same value computed again on the other worker: stored once
        b = c.submit(make, 32 * MiB, 1, workers=[w1], key="b")
        wait(b)
        assert pool_bytes(shmdir, name) < 33 * MiB
        # the client gets bytes, a writable array as without the plugin
        r = a.result()
        assert r.flags.writeable and np.array_equal(r, make(32 * MiB, 1))
        # small values stay in the worker's own mapping
        t = c.submit(make, 4096, 2, workers=[w0], key="t")
        wait(t)
        assert "t" in c.run(worker_view)[w0]["private"]
        del a, b, s, t
    assert files(shmdir) == []                 # the last worker removed the store


def test_broadcast_scatter_is_one_copy_per_host(shmdir):
    x = make(64 * MiB, 3)
    with cluster() as cl, Client(cl) as c:
        c.register_plugin(StorePlugin(directory=shmdir))
        name = store_of(c, shmdir)
        pids = {w: v["pid"] for w, v in c.run(worker_view).items()}
        anon0 = {w: smaps_rollup(p)["Anonymous"] for w, p in pids.items()}
        f = c.scatter(x, broadcast=True)
        assert len(c.who_has(f)[f.key]) == 2
        sums = c.run(lambda dask_worker, k=f.key: checksum(dask_worker.data[k]))
        assert set(sums.values()) == {checksum(x)}
        assert 64 * MiB <= pool_bytes(shmdir, name) < 65 * MiB      # one copy, not two
        v = c.run(worker_view)
        assert all(f.key in e["shared"] for e in v.values())
        assert sum(e["counts"]["received_refs"] for e in v.values()) == 1
        for w, p in pids.items():               # no private copy left in either worker
            grew = smaps_rollup(p)["Anonymous"] - anon0[w]
            assert grew < 16 * MiB, (w, grew / MiB)
        del f
    assert files(shmdir) == []


def hold_and_sum(a, b):
    return checksum(a) ^ checksum(b)


def test_memory_monitor_ignores_shared_pages(shmdir):
    """Two 256 MiB values read by a task: the worker's RSS passes the pause
    threshold, its private memory does not; it must not pause or spill."""
    limit = 640 * MiB
    with cluster(1, memory_limit=limit) as cl, Client(cl) as c:
        c.register_plugin(StorePlugin(directory=shmdir))
        a = c.submit(make, 256 * MiB, 4, key="a")
        wait(a)
        b = c.submit(make, 256 * MiB, 5, key="b")
        s = c.submit(hold_and_sum, a, b, key="s")
        assert s.result() == checksum(make(256 * MiB, 4)) ^ checksum(make(256 * MiB, 5))

        def reading(dask_worker):
            import psutil
            from dedupshm.dask import private_memory
            d = dask_worker.data
            return {"rss": psutil.Process().memory_info().rss, "private": private_memory(),
                    "seen": dask_worker.monitor.get_process_memory(),
                    "spilled": d.spilled_total if hasattr(d, "spilled_total") else None,
                    "slow": len(d.inner.slow) if hasattr(d.inner, "slow") else 0,
                    "status": dask_worker.status.name}
        (r,) = c.run(reading).values()
        pause = 0.8 * limit
        assert r["rss"] > pause                  # the shared pages are in the RSS ...
        assert r["seen"] == pytest.approx(r["private"], abs=16 * MiB) and r["seen"] < pause
        assert r["status"] == "running"
        assert r["slow"] == 0 and not any(r["spilled"] or ())
        logs = "\n".join(m for _, m in next(iter(c.get_worker_logs().values())))
        assert "Pausing worker" not in logs and "Unmanaged memory use is high" not in logs
        del a, b, s
    assert files(shmdir) == []


def slow_sum(x, seconds):
    time.sleep(seconds)
    return checksum(x)


def test_worker_sigkill_mid_task_and_restart(shmdir):
    with cluster() as cl, Client(cl) as c:
        c.register_plugin(StorePlugin(directory=shmdir))
        name = store_of(c, shmdir)
        w0, w1 = sorted(c.scheduler_info()["workers"])
        a = c.submit(make, 16 * MiB, 6, workers=[w0], key="a")
        s = c.submit(slow_sum, a, 5, workers=[w1], key="s", allow_other_workers=True)
        victim = c.run(worker_view)[w1]["pid"]
        wait_for(lambda: c.processing().get(w1), timeout=30, msg="the task to start")
        os.kill(victim, signal.SIGKILL)         # mid-task; the nanny restarts it
        wait_for(lambda: len(c.scheduler_info()["workers"]) == 2
                 and w1 not in c.scheduler_info()["workers"],
                 timeout=60, msg="the restarted worker")
        assert victim not in [v["pid"] for v in c.run(worker_view).values()]
        # the new worker attached to the same store; the dead one's holdings are gone
        assert files(shmdir) == [f"dedupshm.{name}.index", f"dedupshm.{name}.pool"]
        t = c.submit(slow_sum, a, 0, key="t", workers=[w for w in c.scheduler_info()["workers"]
                                                       if w != w0])
        assert t.result() == checksum(make(16 * MiB, 6))
        assert s.result() == t.result()            # the killed task ran again

        def store_state(dask_worker):
            from dedupshm import dask as dd
            st = dd._host.store
            st.gc()
            return [e["pid"] for e in st.clients()], st.check().ok
        for pids, ok in c.run(store_state).values():
            assert victim not in pids and ok         # the dead worker's slot was reaped
        del a, s, t
    assert files(shmdir) == []


# ---- `dask scheduler` / `dask worker` processes, two "hosts"

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def start_scheduler(procs, tmp_path):
    sf = str(tmp_path / "scheduler.json")
    p = procs.add(subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", sf],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_for(lambda: os.path.exists(sf) and os.path.getsize(sf) > 0, timeout=30,
             msg="the scheduler file")
    return p, sf


def start_worker(procs, sf, host, name):
    env = dict(ENV, **{HOST_ENV: host})
    return procs.add(subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", sf,
         "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", name,
         "--host", "127.0.0.1", "--memory-limit", "2GiB"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def by_name(c):
    return {v["name"]: w for w, v in c.scheduler_info()["workers"].items()}


@pytest.mark.limit(150)
def test_cli_cluster_two_hosts_and_crashes(shmdir, procs, tmp_path):
    _, sf = start_scheduler(procs, tmp_path)
    workers = {n: start_worker(procs, sf, h, n)
               for n, h in (("a1", "host-a"), ("a2", "host-a"), ("b1", "host-b"))}
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(3, timeout=60)
        c.register_plugin(StorePlugin(directory=shmdir))
        sched = json.load(open(sf))["address"]
        sa, sb = store_name("host-a", sched), store_name("host-b", sched)
        assert files(shmdir) == sorted(f"dedupshm.{n}.{e}" for n in (sa, sb)
                                       for e in ("index", "pool"))
        w = by_name(c)
        x = c.submit(make, 16 * MiB, 7, workers=[w["a1"]], key="x")
        ya = c.submit(checksum, x, workers=[w["a2"]], key="ya")
        yb = c.submit(checksum, x, workers=[w["b1"]], key="yb")
        assert ya.result() == yb.result() == checksum(make(16 * MiB, 7))
        v = c.run(worker_view)
        assert v[w["a1"]]["counts"]["sent_refs"] == 1          # to a2: a reference
        assert v[w["a1"]]["counts"]["sent_shared_as_bytes"] == 1   # to b1: the bytes
        assert v[w["b1"]]["counts"]["received_refs"] == 0
        assert "x" in v[w["b1"]]["shared"]                     # in host b's own store
        assert 16 * MiB <= pool_bytes(shmdir, sa) < 17 * MiB
        assert 16 * MiB <= pool_bytes(shmdir, sb) < 17 * MiB

        # a1 SIGKILLed mid-task: a2 still holds x in host a's store
        z = c.submit(slow_sum, x, 60, workers=[w["a1"]], key="z")
        wait_for(lambda: c.processing().get(w["a1"]), timeout=30, msg="z to start")
        workers["a1"].send_signal(signal.SIGKILL)
        workers["a1"].wait(10)
        wait_for(lambda: w["a1"] not in c.scheduler_info()["workers"], timeout=60,
                 msg="the scheduler to drop a1")
        assert c.submit(checksum, x, workers=[w["a2"]], key="ya2").result() == ya.result()
        # a2 leaves normally: the last live user of host a's store removes it
        c.retire_workers([w["a2"]], close_workers=True)
        workers["a2"].wait(30)
        assert files(shmdir) == sorted(f"dedupshm.{sb}.{e}" for e in ("index", "pool"))
        # b1 SIGKILLed: nobody is left to remove host b's store ...
        workers["b1"].send_signal(signal.SIGKILL)
        workers["b1"].wait(10)
        assert len(files(shmdir)) == 2
        # ... until the next worker with the plugin starts on the machine
        start_worker(procs, sf, "host-c", "c1")
        c.wait_for_workers(1, timeout=60)
        sc = store_name("host-c", sched)
        wait_for(lambda: files(shmdir) == sorted(f"dedupshm.{sc}.{e}" for e in ("index", "pool")),
                 timeout=30, msg="host b's store to be reclaimed")
        assert c.submit(make, 2 * MiB, 8, key="m").result().sum() == make(2 * MiB, 8).sum()
        c.retire_workers(list(c.scheduler_info()["workers"]), close_workers=True)
        wait_for(lambda: files(shmdir) == [], timeout=30, msg="the last store to go")
        del x, ya, yb, z
