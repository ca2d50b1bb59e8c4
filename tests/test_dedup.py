"""Deduplication and memory accounting, checked against the kernel
(the blocks allocated to the store's own files, which no other activity on
the machine moves -- /proc/meminfo's Shmem is machine-wide and flaky when
anything else runs) and against stats(): identical pages across keys and
processes, all-zero pages, one-page differences, dedup=False, small values,
metadata overhead, capacity and StoreFullError, memory coming back."""
import gc
import multiprocessing as mp
import os

import numpy as np
import pytest

import dedupshm
from helpers import (MiB, PAGE, file_bytes, rand_array, store_bytes, store_files, wait_for,
                     wait_store_bytes_below)
import workers

pytestmark = pytest.mark.memory

NOISE = 2 * MiB        # the index file's own growth (metadata, hint table)


# ================================================================ across processes

@pytest.mark.limit(120)
def test_four_processes_same_64mib_array_cost_64mib(make_store, store_name, procs):
    """Four processes put one 64 MiB array under four keys: the store's files grow by
    ~64 MiB (not 256), and stats() reports 4x logical over 1x physical."""
    size = 64 * MiB
    s = make_store(store_name, capacity="1GiB")
    gc.collect()
    base = store_bytes(s.name)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    q = ctx.Queue()
    ps = [procs.start(ctx, workers.put_same_array, store_name, None, f"k{i}", size, 1234, go, q)
          for i in range(4)]
    ready = [q.get(timeout=60) for _ in ps]
    assert all(r == "ready" for r in ready), ready
    go.set()  # all four put at once
    results = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0, f"child exit code {p.exitcode}"
    assert all(r[0] == "done" for r in results), results
    delta = store_bytes(s.name) - base
    assert delta >= size - NOISE, f"store files grew only {delta / MiB:.1f} MiB: data not in shared memory?"
    assert delta <= size * 1.25 + NOISE, \
        f"4 x identical 64 MiB grew the store's files by {delta / MiB:.1f} MiB (expected ~64)"
    pool = file_bytes(store_files(store_name)[1])
    assert size <= pool <= size * 1.25, f"pool file holds {pool / MiB:.1f} MiB for 64 MiB of pages"
    st = s.stats()
    assert st["objects"] == 4
    assert 4 * size <= st["logical_bytes"] <= 4 * size + 256 * 1024
    assert size <= st["physical_bytes"] <= size + 256 * 1024
    assert st["dedup_ratio"] >= 3.9
    npages = size // PAGE
    assert st["pages_shared"] >= npages
    assert st["pages_sharing"] >= 3 * npages
    expected = rand_array(size, 1234)
    for i in range(4):
        assert np.array_equal(s[f"k{i}"], expected)


# ================================================================ in one process

def test_same_array_twice_costs_once(make_store):
    s = make_store()
    arr = rand_array(32 * MiB, 1)
    s["a"] = arr
    st1 = s.stats()
    base = store_bytes(s.name)
    refs = [s.put(arr) for _ in range(3)]
    s["b"] = arr
    st2 = s.stats()
    assert st2["physical_bytes"] - st1["physical_bytes"] <= 4 * PAGE
    assert st2["logical_bytes"] - st1["logical_bytes"] >= 4 * arr.nbytes
    assert store_bytes(s.name) - base < NOISE
    assert st2["dedup_ratio"] == pytest.approx(5.0, rel=0.02)
    del refs


def test_dedup_false_stores_a_private_copy(make_store):
    s = make_store()
    arr = rand_array(32 * MiB, 2)
    s["a"] = arr
    p1 = s.stats()["physical_bytes"]
    base = store_bytes(s.name)
    s.put(arr, key="b", dedup=False)
    st = s.stats()
    assert st["physical_bytes"] - p1 >= arr.nbytes
    assert store_bytes(s.name) - base >= arr.nbytes - NOISE
    assert np.array_equal(s["b"], arr)
    # and a later deduplicating put does not share the opted-out pages either way:
    # it shares the first copy, so physical stays at two copies
    s["c"] = arr
    assert s.stats()["physical_bytes"] - p1 <= arr.nbytes + 4 * PAGE


def test_all_zero_pages_cost_nothing(make_store):
    s = make_store()
    size = 64 * MiB
    base = store_bytes(s.name)
    p0 = s.stats()["physical_bytes"]
    s["z"] = np.zeros(size, dtype=np.uint8)
    st = s.stats()
    assert st["logical_bytes"] >= size
    assert st["physical_bytes"] - p0 <= 4 * PAGE, f"zeros cost {st['physical_bytes'] - p0} bytes"
    out = s["z"]
    assert out.shape == (size,)
    assert not out.any()
    assert store_bytes(s.name) - base < NOISE, "zero pages took shared memory"


def test_half_zero_pages(make_store):
    s = make_store()
    a = rand_array(16 * MiB, 3).reshape(-1, PAGE)
    a[::2] = 0  # every other page zero
    s["a"] = a
    st = s.stats()
    half = a.size // 2
    assert half <= st["physical_bytes"] <= half + 4 * PAGE
    assert np.array_equal(s["a"], a)


def test_array_differing_in_one_page_costs_one_page(make_store):
    s = make_store()
    a = rand_array(32 * MiB, 4)
    s["a"] = a
    p1 = s.stats()["physical_bytes"]
    base = store_bytes(s.name)
    b = a.copy()
    b[1000 * PAGE + 17] ^= 0x5A
    s["b"] = b
    st = s.stats()
    grew = st["physical_bytes"] - p1
    assert PAGE <= grew <= 2 * PAGE, f"one differing page cost {grew} physical bytes"
    assert store_bytes(s.name) - base < NOISE
    assert np.array_equal(s["b"], b)
    assert np.array_equal(s["a"], a)
    assert st["pages_shared"] >= a.size // PAGE - 2


def test_dedup_across_bytes_and_pickled_buffers(make_store):
    """An array inside a dict (out-of-band pickle buffer) shares pages with
    the same array stored on its own."""
    s = make_store()
    a = rand_array(16 * MiB, 5)
    s["plain"] = a
    p1 = s.stats()["physical_bytes"]
    s["dict"] = {"x": a, "label": "same pages"}
    grew = s.stats()["physical_bytes"] - p1
    assert grew <= 4 * PAGE, f"array inside a dict was not deduplicated ({grew} bytes)"


# ================================================================ memory comes back

@pytest.mark.limit(60)
def test_delete_returns_memory(make_store, store_name):
    s = make_store(store_name, warm_bytes=0)
    pool = store_files(store_name)[1]
    gc.collect()
    base = store_bytes(s.name)
    s["a"] = rand_array(64 * MiB, 6)
    up = store_bytes(s.name) - base
    assert up >= 64 * MiB - NOISE
    assert file_bytes(pool) >= 64 * MiB
    del s["a"]
    wait_store_bytes_below(s.name, base + NOISE, timeout=10)
    assert file_bytes(pool) <= 1 * MiB, f"pool still holds {file_bytes(pool) / MiB:.1f} MiB"
    st = s.stats()
    assert st["objects"] == 0
    assert st["physical_bytes"] <= PAGE


@pytest.mark.limit(60)
def test_unkeyed_ref_release_returns_memory(make_store):
    s = make_store(warm_bytes=0)
    gc.collect()
    base = store_bytes(s.name)
    ref = s.put(rand_array(64 * MiB, 7))
    assert store_bytes(s.name) - base >= 64 * MiB - NOISE
    assert s.stats()["objects"] == 1
    del ref
    wait_store_bytes_below(s.name, base + NOISE, timeout=10)
    assert s.stats()["objects"] == 0


def test_shared_page_survives_delete_of_one_sharer(make_store):
    s = make_store(warm_bytes=0)
    a = rand_array(32 * MiB, 8)
    s["a"] = a
    s["b"] = a
    del s["a"]
    st = s.stats()
    assert a.nbytes <= st["physical_bytes"] <= a.nbytes + 4 * PAGE
    assert np.array_equal(s["b"], a)
    del s["b"]
    assert s.stats()["physical_bytes"] <= PAGE


@pytest.mark.limit(60)
def test_view_keeps_deleted_object_until_released(make_store):
    """Deleting an object someone reads never changes the reader's bytes;
    memory comes back once the view is released."""
    s = make_store(warm_bytes=0)
    gc.collect()
    base = store_bytes(s.name)
    a = rand_array(64 * MiB, 9)
    s["a"] = a
    view = s["a"]
    del s["a"]
    s.gc()
    assert "a" not in s
    # new values of the same size must get other pages
    for i in range(3):
        s[f"n{i}"] = rand_array(32 * MiB, 50 + i)
        del s[f"n{i}"]
    assert np.array_equal(view, a), "a deleted object's bytes changed under its reader"
    assert store_bytes(s.name) - base >= 64 * MiB - NOISE, "pages under a live view were freed"
    del view
    wait_store_bytes_below(s.name, base + NOISE, timeout=10)


def test_warm_pages_are_reused(make_store):
    """With the default warm list, freeing then putting the same amount does
    not grow the store's files beyond one copy (plus the bounded warm list)."""
    s = make_store()
    gc.collect()
    base = store_bytes(s.name)
    for i in range(3):
        s["v"] = rand_array(32 * MiB, 60 + i)
    # at most the live value plus a bounded warm list plus noise
    assert store_bytes(s.name) - base <= 3 * 32 * MiB + NOISE
    assert s.stats()["physical_bytes"] <= 32 * MiB + 4 * PAGE


# ================================================================ small values

def test_small_values_are_packed(make_store):
    s = make_store()
    p0 = s.stats()["physical_bytes"]
    n = 2000
    for i in range(n):
        s[f"s{i}"] = (b"%06d" % i) * 50          # 300 distinct bytes each
    st = s.stats()
    grew = st["physical_bytes"] - p0
    assert grew < n * 1024, f"{n} small values cost {grew} physical bytes ({grew / n:.0f} each)"
    assert st["logical_bytes"] >= n * 300
    for i in range(0, n, 111):
        assert bytes(s[f"s{i}"]) == (b"%06d" % i) * 50


def test_identical_small_values_stored_once(make_store):
    s = make_store()
    p0 = s.stats()["physical_bytes"]
    v = bytes(range(256)) + b"x" * 44
    n = 2000
    for i in range(n):
        s[f"s{i}"] = v
    refs = [s.put(v) for _ in range(200)]
    st = s.stats()
    grew = st["physical_bytes"] - p0
    assert grew <= 2 * PAGE, f"{n} identical small values cost {grew} physical bytes"
    assert st["logical_bytes"] >= (n + 200) * 300
    assert st["dedup_ratio"] > 50
    assert bytes(s["s1234"]) == v
    del refs


def test_small_pickled_objects_packed(make_store):
    s = make_store()
    p0 = s.stats()["physical_bytes"]
    for i in range(1000):
        s[f"o{i}"] = {"id": i, "name": f"object {i}", "tags": ["a", "b"]}
    assert s.stats()["physical_bytes"] - p0 < 1000 * 1024
    assert s["o500"] == {"id": 500, "name": "object 500", "tags": ["a", "b"]}


# ================================================================ metadata overhead

def test_metadata_overhead_below_half_percent(make_store, store_name):
    s = make_store(store_name)
    index = store_files(store_name)[0]
    s["warmup"] = rand_array(16 * MiB, 98)   # let the index take its first growth steps
    st0 = s.stats()
    blocks0 = os.stat(index).st_blocks * 512
    refs = []
    for i in range(96):
        s[f"m{i}"] = rand_array(1 * MiB, 100 + i)
    refs.append(s.put(rand_array(16 * MiB, 99)))
    st = s.stats()
    logical = st["logical_bytes"] - st0["logical_bytes"]
    assert logical >= 112 * MiB
    meta = st["metadata_bytes"] - st0["metadata_bytes"]
    assert 0 < meta <= 0.005 * logical, f"metadata {meta} bytes for {logical} logical"
    assert st["metadata_bytes"] <= 0.005 * st["logical_bytes"] + 64 * 1024
    # the index file really grows no more than that (plus one growth step)
    grown = os.stat(index).st_blocks * 512 - blocks0
    assert grown <= 0.005 * logical + 256 * 1024, f"index file grew {grown} bytes for {logical}"


# ================================================================ capacity

def test_store_full_leaves_store_unchanged(make_store):
    s = make_store(capacity="16MiB")
    a = rand_array(14 * MiB, 10)
    s["a"] = a
    before = s.stats()
    b = rand_array(4 * MiB, 11)
    with pytest.raises(dedupshm.StoreFullError) as ei:
        s.put(b, key="b")
    assert isinstance(ei.value, MemoryError)
    assert isinstance(ei.value, dedupshm.DedupShmError)
    after = s.stats()
    for k in ("objects", "logical_bytes", "physical_bytes", "pages_shared", "pages_sharing"):
        assert after[k] == before[k], f"{k}: {before[k]} -> {after[k]}"
    assert "b" not in s
    assert len(s) == 1
    with pytest.raises(dedupshm.StoreFullError):
        s["b"] = b
    with pytest.raises(dedupshm.StoreFullError):
        with s.create("c", 4 * MiB) as buf:
            buf[:] = b.tobytes()
    assert "c" not in s
    assert s.stats()["physical_bytes"] == before["physical_bytes"]
    assert np.array_equal(s["a"], a)


def test_full_store_accepts_fully_deduplicated_put(make_store):
    s = make_store(capacity="16MiB")
    a = rand_array(15 * MiB, 12)
    s["a"] = a
    with pytest.raises(dedupshm.StoreFullError):
        s.put(rand_array(2 * MiB, 13))
    # same bytes: every page dedups, so it fits
    s["a2"] = a
    r = s.put(a.copy())
    s["z"] = np.zeros(8 * MiB, dtype=np.uint8)  # zero pages cost nothing either
    assert np.array_equal(s["a2"], a)
    assert np.array_equal(s.get(r), a)
    assert s.stats()["physical_bytes"] <= 15 * MiB + 4 * PAGE


def test_space_comes_back_after_delete(make_store):
    s = make_store(capacity="16MiB")
    s["a"] = rand_array(12 * MiB, 14)
    b = rand_array(12 * MiB, 15)
    with pytest.raises(dedupshm.StoreFullError):
        s["b"] = b
    del s["a"]
    s["b"] = b
    assert np.array_equal(s["b"], b)


def test_full_store_put_with_key_keeps_old_binding(make_store):
    s = make_store(capacity="8MiB")
    s["k"] = b"old value"
    s["big"] = rand_array(7 * MiB, 16)
    with pytest.raises(dedupshm.StoreFullError):
        s["k"] = rand_array(4 * MiB, 17)
    assert bytes(s["k"]) == b"old value"


# ================================================================ property: exact page accounting

from hypothesis import HealthCheck, given, settings, strategies as hs  # noqa: E402

_PAGES = None


def _page_bank():
    global _PAGES
    if _PAGES is None:
        _PAGES = rand_array(12 * PAGE, 4242).reshape(12, PAGE)
    return _PAGES


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=hs.lists(hs.lists(hs.integers(-1, 11), min_size=1, max_size=48),
                       min_size=1, max_size=4),
       dedup=hs.booleans())
def test_physical_bytes_equal_distinct_nonzero_pages(make_store, values, dedup):
    """Values built from a small bank of pages (-1 = an all-zero page): the
    store holds exactly one physical page per distinct non-zero page (and
    one per non-zero page with dedup=False); all of it goes on release."""
    store = make_store(warm_bytes=0)   # a fresh store per example
    bank = _page_bank()
    refs = []
    arrays = []
    for ids in values:
        a = np.stack([bank[i] if i >= 0 else np.zeros(PAGE, np.uint8) for i in ids]).ravel()
        refs.append(store.put(a, dedup=dedup))
        arrays.append(a)
    st = store.stats()
    if dedup:
        distinct = {i for ids in values for i in ids if i >= 0}
        expect = len(distinct) * PAGE
    else:
        expect = sum(1 for ids in values for i in ids if i >= 0) * PAGE
    assert expect <= st["physical_bytes"] <= expect + PAGE, \
        f"physical {st['physical_bytes']} for {expect // PAGE} pages"
    assert st["logical_bytes"] >= sum(a.nbytes for a in arrays)
    for i, a in enumerate(arrays):
        assert np.array_equal(store.get(refs[i]), a)
    del refs
    gc.collect()
    st = store.stats()
    assert st["objects"] == 0
    assert st["physical_bytes"] == 0
    store.close()
