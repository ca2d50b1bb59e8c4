"""dedupshm.server with real processes: shared_load loads once for many
processes, survives a loader that dies or raises, times out; load_mergeable
copies are merged; and a real gunicorn serves from one copy."""
import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np
import pytest

import dedupshm
from helpers import in_store
from dedupshm.server import _marker_key, load_mergeable, shared_load

FORK = mp.get_context("fork")
HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def weights():
    return np.random.default_rng(7).standard_normal(MiB // 2)     # 4 MiB


def _worker(name, counter, q, delay):
    store = dedupshm.Store(name)

    def loader():
        with counter.get_lock():
            counter.value += 1
        time.sleep(delay)
        return weights()

    w = shared_load(store, "weights", loader, timeout=30)
    q.put((float(w.sum()), w.flags.writeable, in_store(w, name)))


def _run(procs):
    for p in procs:
        p.start()
    return procs


def _reap(procs):
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def test_shared_load_loads_once_for_all(tstore):
    counter = FORK.Value("i", 0)
    q = FORK.Queue()
    procs = _run([FORK.Process(target=_worker, args=(tstore.name, counter, q, 0.3), daemon=True)
                  for _ in range(4)])
    try:
        got = [q.get(timeout=30) for _ in procs]
    finally:
        _reap(procs)
    expect = float(weights().sum())
    assert got == [(expect, False, True)] * 4
    # lock-free: two racing loaders are possible, never more than one copy
    assert 1 <= counter.value <= 2
    assert tstore.stats()["physical_bytes"] <= 4 * MiB + 64 * 1024
    assert _marker_key("weights") not in tstore          # the marker is gone
    w = shared_load(tstore, "weights", lambda: pytest.fail("must not load again"))
    assert in_store(w, tstore.name)


def _slow_loader(name, started):
    store = dedupshm.Store(name)

    def loader():
        started.set()
        time.sleep(60)
    shared_load(store, "w", loader)


def test_loader_killed_another_takes_over(tstore):
    started = FORK.Event()
    p = FORK.Process(target=_slow_loader, args=(tstore.name, started), daemon=True)
    p.start()
    try:
        assert started.wait(30)
        assert _marker_key("w") in tstore
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        t0 = time.monotonic()
        w = shared_load(tstore, "w", weights, timeout=10)
        assert time.monotonic() - t0 < 5
        assert float(w.sum()) == float(weights().sum())
    finally:
        _reap([p])


def test_loader_raises_then_next_loads(tstore):
    def bad():
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError, match="disk gone"):
        shared_load(tstore, "w", bad)
    assert _marker_key("w") not in tstore and "w" not in tstore
    assert shared_load(tstore, "w", lambda: {"table": list(range(500))})["table"][-1] == 499


def test_waiter_times_out_while_a_live_loader_holds(tstore):
    tstore.put(tstore._c().identity(), key=_marker_key("w"))   # "this process is loading it"
    q = FORK.Queue()

    def wait_for_it():
        try:
            shared_load(dedupshm.Store(tstore.name), "w", weights, timeout=0.3)
            q.put("loaded")
        except TimeoutError:
            q.put("timeout")
    p = FORK.Process(target=wait_for_it, daemon=True)
    p.start()
    try:
        assert q.get(timeout=30) == "timeout"
    finally:
        _reap([p])


def test_waiter_takes_over_from_a_dead_loader(tstore):
    """A marker naming a client that is gone (here: never was) is stale."""
    tstore.put(b"4095:1", key=_marker_key("w"))
    assert shared_load(tstore, "w", lambda: b"v" * 10, timeout=5) == b"v" * 10


def _mergeable_worker(name, q, stop):
    store = dedupshm.Store(name)
    w = load_mergeable(store, weights)
    q.put((w.flags.writeable, float(w.sum())))
    stop.wait(30)
    store.merger.stop()


def test_load_mergeable_copies_merge(tstore):
    q, stop = FORK.Queue(), FORK.Event()
    procs = _run([FORK.Process(target=_mergeable_worker, args=(tstore.name, q, stop), daemon=True)
                  for _ in range(2)])
    try:
        assert [q.get(timeout=30) for _ in procs] == [(True, float(weights().sum()))] * 2
        pages = 4 * MiB // 4096
        deadline = time.monotonic() + 30
        while tstore.stats()["pages_merged"] < 2 * pages and time.monotonic() < deadline:
            time.sleep(0.1)
        st = tstore.stats()
        assert st["pages_merged"] >= 2 * pages
        assert st["physical_bytes"] <= 4 * MiB + 64 * 1024
    finally:
        stop.set()
        _reap(procs)


@pytest.mark.limit(60)
def test_gunicorn_workers_share_one_copy():
    pytest.importorskip("gunicorn")
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    try:
        import prefork
    finally:
        sys.path.pop(0)
    r = prefork.run("store", mib=16, workers=2, requests=20)
    base = prefork.run("none", mib=16, workers=2, requests=20)
    assert r["workers"] == 2 and r["pids_answering"] >= 1
    extra = (r["workers_pss"] - base["workers_pss"]) / r["one_copy"]
    assert 0.8 < extra < 1.5, (r, base)
    assert abs(r["store_physical"] - r["one_copy"]) < MiB
