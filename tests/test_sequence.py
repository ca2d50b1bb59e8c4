"""SharedSequence: a read-only list of Python objects serialized once into a
store.  List behaviour, pickling as a reference, lifetime, and the point of
it all: reading it in other processes never copies its pages."""
import gc
import multiprocessing as mp
import pickle
import re

import numpy as np
import pytest

import dedupshm
from helpers import wait_objects
from dedupshm.sequence import SharedSequence, put_sequence

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")


def items(n):
    return [{"id": i, "name": f"item-{i}", "v": i * 0.5, "tags": ["a", "b"][: i % 3]}
            for i in range(n)]


def test_behaves_like_a_list(tstore):
    data = items(5000) + [None, (1, 2), "x" * 10000, np.arange(3)]
    ref = put_sequence(tstore, data)
    seq = tstore.get(ref)
    assert isinstance(seq, SharedSequence)
    assert len(seq) == len(data)
    assert seq[0] == data[0] and seq[4999] == data[4999]
    assert seq[-2] == data[-2] and seq[-len(data)] == data[0]
    assert seq[10:20] == data[10:20] and seq[::-1][1:5] == data[::-1][1:5]
    assert seq[5:2] == [] and seq[-3:] [:2] == data[-3:-1]
    assert (seq[-1] == np.arange(3)).all()
    assert list(seq)[:5000] == data[:5000]
    assert data[7] in seq[:5003] and seq[:5003].index(data[9]) == 9
    with pytest.raises(IndexError):
        seq[len(data)]
    with pytest.raises(IndexError):
        seq[-len(data) - 1]
    with pytest.raises(TypeError):
        seq["a"]
    assert seq[np.int64(3)] == data[3]
    # each access is a fresh object: mutating it changes nothing stored
    seq[0]["id"] = -1
    assert seq[0]["id"] == 0
    assert "SharedSequence of 5004 items" in repr(seq)


def test_small_empty_and_keyed(tstore):
    assert len(tstore.get(put_sequence(tstore, []))) == 0
    # 2-64 KiB of items, all in one pickle: the size the core's put refused
    for n in (100, 300, 1000):
        assert tstore.get(put_sequence(tstore, [str(i) * 3 for i in range(n)]))[-1] == str(n - 1) * 3
    assert list(tstore.get(put_sequence(tstore, iter([1, 2, 3])))) == [1, 2, 3]
    put_sequence(tstore, (x * x for x in range(100)), key="squares")
    seq = tstore["squares"]
    assert isinstance(seq, SharedSequence) and seq[-1] == 99 * 99
    with pytest.raises(TypeError):
        put_sequence(tstore, [lambda: 0])


def test_store_put_sequence_method(tstore):
    if not hasattr(dedupshm.Store, "put_sequence"):
        pytest.skip("Store.put_sequence not wired yet")
    assert list(tstore.get(tstore.put_sequence(range(3)))) == [0, 1, 2]


def test_data_lives_in_store_and_is_freed(tstore):
    ref = put_sequence(tstore, items(20000))
    seq = tstore.get(ref)
    assert seq.nbytes > 500_000
    assert tstore.stats()["physical_bytes"] >= seq.nbytes
    del ref
    assert seq[123]["id"] == 123            # the sequence keeps it alive
    del seq
    assert wait_objects(tstore, 0) == 0


def _child_sum(seq, q):
    q.put((len(seq), sum(x["id"] for x in seq), seq[-1]["name"]))


@pytest.mark.parametrize("ctx", [FORK, SPAWN], ids=["fork", "spawn"])
def test_pickles_as_a_reference(tstore, ctx):
    n = 20000
    ref = put_sequence(tstore, items(n))
    seq = tstore.get(ref)
    blob = pickle.dumps(seq)
    assert len(blob) < 1024 < seq.nbytes
    before = tstore.stats()["physical_bytes"]
    q = ctx.Queue()
    p = ctx.Process(target=_child_sum, args=(seq, q), daemon=True)
    p.start()
    try:
        assert q.get(timeout=60) == (n, n * (n - 1) // 2, f"item-{n - 1}")
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    assert tstore.stats()["physical_bytes"] == before


def _get_and_repickle(name, ref, q):
    store = dedupshm.Store(name)
    seq = store.get(ref)              # a plain get: the sequence learns its ref lazily
    q.put(pickle.dumps(seq))
    q.put(len(pickle.loads(pickle.dumps(seq))))


def test_plain_get_in_other_process_still_pickles(tstore):
    ref = put_sequence(tstore, items(20000))
    phys = tstore.stats()["physical_bytes"]
    q = SPAWN.Queue()
    p = SPAWN.Process(target=_get_and_repickle, args=(tstore.name, ref, q), daemon=True)
    p.start()
    try:
        blob = q.get(timeout=60)
        assert q.get(timeout=60) == 20000
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    seq = pickle.loads(blob)
    assert seq[5]["id"] == 5
    # storing it again shared every page with the first copy
    assert tstore.stats()["physical_bytes"] <= phys + 8192


def _private_bytes(pid="self"):
    out = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", line)
            if m:
                out += int(m.group(1)) * 1024
    return out


def _read_all(dataset, q):
    gc.freeze()
    before = _private_bytes()
    total = 0
    for _ in range(2):
        for i in range(len(dataset)):
            total += dataset[i]["id"]
    q.put((_private_bytes() - before, total))


def test_reading_in_workers_never_copies_pages(tstore):
    """The DataLoader problem (pytorch #13246): forked readers of a list of
    dicts copy its pages (reference counts); of a SharedSequence, not."""
    n = 200_000
    data = items(n)
    seq = tstore.get(put_sequence(tstore, data))
    growth = {}
    for label, ds in (("list", data), ("seq", seq)):
        q = FORK.Queue()
        p = FORK.Process(target=_read_all, args=(ds, q), daemon=True)
        p.start()
        try:
            growth[label], total = q.get(timeout=60)
            assert total == 2 * n * (n - 1) // 2
            p.join(30)
        finally:
            if p.is_alive():
                p.kill()
                p.join()
    assert growth["seq"] < 4 << 20, growth
    assert growth["list"] > 4 * growth["seq"], growth
