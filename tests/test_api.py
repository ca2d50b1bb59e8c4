"""Store API: names, attach/create, put/get of every value kind, the mapping
protocol, keys, errors, create(), writable (copy-on-write) views."""
import gc
import os
import pickle
import re
import shutil
import tempfile

import numpy as np
import pytest

import dedupshm
from helpers import MiB, PAGE, SHM_DIR, in_pool, memory_reading, rand_array, store_files


class Point:
    """A picklable user class (module level so pickle can find it)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


# ================================================================ names and files

@pytest.mark.parametrize("bad", ["", "x" * 65, "a/b", "a b", "a\x00b", "ü", "a:b", "../x",
                                 "a\nb", "*"])
def test_invalid_name_rejected(bad):
    with pytest.raises(ValueError):
        dedupshm.Store(bad, create=True)
    # nothing was created for it
    assert not [f for f in os.listdir(SHM_DIR) if f.startswith("dedupshm.") and bad and bad in f]


def test_non_str_name_rejected():
    with pytest.raises((TypeError, ValueError)):
        dedupshm.Store(123, create=True)


@pytest.mark.parametrize("suffix", ["x" * 50, "a.B_c-9"])
def test_valid_names_accepted(make_store, store_name, suffix):
    name = (store_name + suffix)[:64]
    assert len(name) <= 64
    s = make_store(name)
    for path in store_files(name):
        assert os.path.exists(path), path


def test_name_of_exactly_64_chars(make_store, store_name):
    name = (store_name + "y" * 64)[:64]
    s = make_store(name)
    s["k"] = b"v"
    assert bytes(s["k"]) == b"v"


def test_arguments_are_keyword_only(store_name):
    with pytest.raises(TypeError):
        dedupshm.Store(store_name, True)
    assert not os.path.exists(store_files(store_name)[0])


def test_attach_missing_raises_filenotfound(store_name):
    with pytest.raises(FileNotFoundError):
        dedupshm.Store(store_name)
    with pytest.raises(FileNotFoundError):
        dedupshm.Store(store_name, create=False)
    assert not os.path.exists(store_files(store_name)[0])


def test_create_then_attach_sees_same_data(make_store, store_name):
    a = make_store(store_name)
    a["k"] = {"v": 1}
    b = make_store(store_name, create=False)
    assert b["k"] == {"v": 1}
    c = make_store(store_name, create=True)  # create=True attaches to an existing store
    assert c["k"] == {"v": 1}
    c["k2"] = "from c"
    assert a["k2"] == "from c"


def test_files_in_default_directory_carry_name(make_store, store_name):
    before = set(os.listdir(SHM_DIR))
    s = make_store(store_name)
    s["a"] = rand_array(2 * MiB, 1)
    s.put(b"small")
    new = set(os.listdir(SHM_DIR)) - before
    # ignore other test stores that concurrent test runs may create meanwhile
    other = re.compile(r"dedupshm\.t\d+-[0-9a-f]+\.(index|pool)$")
    new = {f for f in new if store_name in f or not other.match(f)}
    assert new == {f"dedupshm.{store_name}.index", f"dedupshm.{store_name}.pool"}


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_custom_directory(make_store, store_name, tmp_path, where):
    d = tempfile.mkdtemp(dir=SHM_DIR, prefix="dedupshm-testdir-") if where == "tmpfs" \
        else str(tmp_path)
    try:
        s = make_store(store_name, directory=d)
        arr = rand_array(1 * MiB, 2)
        s["arr"] = arr
        s["obj"] = {"x": [1, 2, 3]}
        assert np.array_equal(s["arr"], arr)
        assert sorted(os.listdir(d)) == sorted([f"dedupshm.{store_name}.index",
                                                f"dedupshm.{store_name}.pool"])
        # nothing with that name appeared in the default directory
        assert not [f for f in os.listdir(SHM_DIR) if store_name in f]
        # attach in the same directory only
        with pytest.raises(FileNotFoundError):
            dedupshm.Store(store_name)
        t = make_store(store_name, directory=d, create=False)
        assert t["obj"] == {"x": [1, 2, 3]}
        t.close()
        s.unlink()
        assert os.listdir(d) == []
    finally:
        if where == "tmpfs":
            shutil.rmtree(d, ignore_errors=True)


def test_context_manager_and_idempotent_close(store_name, make_store):
    with dedupshm.Store(store_name, create=True) as s:
        assert isinstance(s, dedupshm.Store)
        s["k"] = b"x"
    s.close()
    s.close()
    # data outlives the handle
    t = make_store(store_name, create=False)
    assert bytes(t["k"]) == b"x"


def test_unlink_removes_files_attached_handle_keeps_working(make_store, store_name):
    s = make_store(store_name)
    arr = rand_array(4 * MiB, 3)
    s["a"] = arr
    held = s["a"]
    s.unlink()
    for p in store_files(store_name):
        assert not os.path.exists(p)
    with pytest.raises(FileNotFoundError):
        dedupshm.Store(store_name)
    # still usable by this process
    assert np.array_equal(held, arr)
    s["b"] = {"still": "works"}
    assert s["b"] == {"still": "works"}
    assert np.array_equal(s["a"], arr)
    s.close()
    s.close()
    assert np.array_equal(held, arr)


def test_views_survive_close(make_store):
    s = make_store()
    arr = rand_array(3 * MiB, 4)
    s["a"] = arr
    s["b"] = b"hello" * 1000
    a = s["a"]
    b = s.get("b")
    s.close()
    gc.collect()
    assert np.array_equal(a, arr)
    assert bytes(b) == b"hello" * 1000


# ================================================================ exceptions

def test_exception_hierarchy():
    assert issubclass(dedupshm.DedupShmError, Exception)
    assert issubclass(dedupshm.StoreFullError, dedupshm.DedupShmError)
    assert issubclass(dedupshm.StoreFullError, MemoryError)


# ================================================================ capacity argument

@pytest.mark.parametrize("cap,expected", [("512MiB", 512 * MiB), ("2GiB", 2 << 30),
                                          (24 * MiB, 24 * MiB), ("4MiB", 4 * MiB)])
def test_capacity_values(make_store, cap, expected):
    s = make_store(capacity=cap)
    st = s.stats()
    if "capacity" in st:
        assert st["capacity"] == expected
    if expected <= 64 * MiB:
        # a unique value larger than the capacity never fits ...
        with pytest.raises(dedupshm.StoreFullError):
            s.put(rand_array(expected + 2 * PAGE, 5))
        # ... one a bit smaller does
        s.put(rand_array(expected - 16 * PAGE, 5), key="fits")
        assert "fits" in s
    else:
        # the unit was understood: 16 MiB fits easily
        s["x"] = rand_array(16 * MiB, 5)
        assert s["x"].nbytes == 16 * MiB


@pytest.mark.parametrize("cap", ["lots", "12XB", "-5MiB", -1, "MiB", ""])
def test_bad_capacity_rejected(store_name, cap):
    with pytest.raises((ValueError, TypeError)):
        dedupshm.Store(store_name, create=True, capacity=cap)
    assert not os.path.exists(store_files(store_name)[0])


def test_capacity_wrong_type(store_name):
    with pytest.raises(TypeError):
        dedupshm.Store(store_name, create=True, capacity=[1])
    assert not os.path.exists(store_files(store_name)[0])


# ================================================================ put / get: arrays

ARRAYS = [
    ("int64-2d", lambda: np.arange(300 * 700, dtype=np.int64).reshape(300, 700)),
    ("float32-3d", lambda: np.linspace(0, 1, 24 * 50 * 40, dtype=np.float32).reshape(24, 50, 40)),
    ("bool", lambda: (np.arange(100_001) % 3 == 0)),
    ("complex128", lambda: np.arange(5000, dtype=np.complex128) * (1 + 2j)),
    ("uint8-big", lambda: rand_array(5 * MiB + 123, 6)),
    ("fortran", lambda: np.asfortranarray(np.arange(600 * 401, dtype=np.float64).reshape(600, 401))),
    ("noncontig", lambda: np.arange(1000 * 1000, dtype=np.int32).reshape(1000, 1000)[:, ::3]),
    ("structured", lambda: np.array([(i, float(i) / 3) for i in range(3000)],
                                    dtype=[("a", "<i4"), ("b", "<f8")])),
    ("bigendian", lambda: np.arange(10000, dtype=">u4")),
    ("zero-d", lambda: np.array(3.25)),
    ("empty", lambda: np.zeros((0, 7), dtype=np.int16)),
    ("datetime", lambda: np.arange("2020-01-01", "2020-12-31", dtype="datetime64[D]")),
]


@pytest.mark.parametrize("label,mk", ARRAYS, ids=[a[0] for a in ARRAYS])
def test_ndarray_roundtrip(store, label, mk):
    arr = mk()
    ref = store.put(arr)
    assert isinstance(ref, dedupshm.ObjectRef)
    out = store.get(ref)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert out.flags.writeable is False
    with pytest.raises(ValueError):
        out[...] = np.zeros((), dtype=out.dtype)
    # a keyed put behaves the same
    store["k"] = arr
    assert np.array_equal(store["k"], arr)


@pytest.mark.parametrize("nbytes", [1 * MiB, 16 * MiB + 8])
def test_ndarray_zero_copy_in_pool(make_store, store_name, nbytes):
    store = make_store(store_name)
    arr = rand_array(nbytes, 7)
    store["a"] = arr
    out = store["a"]
    assert in_pool(out, store_name), "array bytes are not a view of the pool file"
    assert np.array_equal(out, arr)
    out2 = store.get("a")
    assert in_pool(out2, store_name)


def test_get_does_not_copy_into_private_memory(store):
    """Reading a 32 MiB value maps pool pages: Rss_Anon barely moves."""
    arr = rand_array(32 * MiB, 8)
    store["a"] = arr
    del arr
    gc.collect()
    before = memory_reading()
    out = store["a"]
    total = int(out.sum(dtype=np.uint64))  # touch every page
    after = memory_reading()
    assert total > 0
    anon = after["anon"] - before["anon"]
    assert anon < 4 * MiB, f"get() copied: anonymous memory grew {anon/MiB:.1f} MiB"
    assert after["shmem"] >= 32 * MiB, "the value's pages are not resident shared memory"
    assert np.array_equal(out[:4096], rand_array(32 * MiB, 8)[:4096])


# ================================================================ put / get: bytes-like

@pytest.mark.parametrize("make", [
    lambda: b"hello world",
    lambda: bytearray(b"abc" * 1000),
    lambda: memoryview(b"xyz" * 5000),
    lambda: bytes(rand_array(3 * MiB + 17, 9)),
    lambda: b"",
], ids=["bytes-small", "bytearray", "memoryview", "bytes-large", "empty"])
def test_bytes_like_roundtrip_readonly(store, make):
    v = make()
    expected = bytes(v)
    ref = store.put(v)
    out = store.get(ref)
    assert isinstance(out, memoryview)
    assert out.readonly
    assert out.nbytes == len(expected)
    assert out.tobytes() == expected
    if len(expected):
        with pytest.raises(TypeError):
            out[0] = 1


def test_large_bytes_zero_copy(make_store, store_name):
    store = make_store(store_name)
    v = bytes(rand_array(8 * MiB, 10))
    store["b"] = v
    out = store["b"]
    assert isinstance(out, memoryview)
    assert in_pool(out, store_name)
    assert out.tobytes() == v


def test_memoryview_of_noncontiguous_rejected_or_roundtrips(store):
    base = np.arange(10000, dtype=np.uint8)
    mv = memoryview(base)[::2]
    try:
        ref = store.put(mv)
    except (TypeError, ValueError):
        return
    assert store.get(ref).tobytes() == mv.tobytes()


# ================================================================ put / get: pickled objects

@pytest.mark.parametrize("value", [
    {"a": 1, "b": [1, 2, (3, 4)], "c": None},
    [1, 2.5, "three", b"four", {5}],
    ("tuple", 1),
    "a string ü",
    12345678901234567890,
    3.5,
    None,
    True,
    Point(1, 2),
    list(range(200_000)),
    {"nested": {"deep": [Point(3, 4)] * 3}},
], ids=lambda v: type(v).__name__)
def test_object_roundtrip(store, value):
    ref = store.put(value)
    assert store.get(ref) == value
    store["k"] = value
    assert store["k"] == value


def test_dict_with_arrays_keeps_buffers_in_shared_memory(make_store, store_name):
    store = make_store(store_name)
    a = rand_array(4 * MiB, 11)
    b = np.arange(600_000, dtype=np.float64)
    value = {"a": a, "b": b, "meta": {"n": 2}, "s": "text"}
    store["d"] = value
    out = store["d"]
    assert set(out) == {"a", "b", "meta", "s"}
    assert out["meta"] == {"n": 2} and out["s"] == "text"
    assert np.array_equal(out["a"], a) and np.array_equal(out["b"], b)
    assert out["b"].dtype == np.float64
    for k in ("a", "b"):
        assert out[k].flags.writeable is False
        assert in_pool(out[k], store_name), f"{k} was copied out of the pool"


def test_unpicklable_value_rejected_and_store_unchanged(store):
    before = store.stats()
    with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
        store.put(lambda x: x, key="f")
    assert "f" not in store
    after = store.stats()
    assert after["objects"] == before["objects"]


# ================================================================ ObjectRef

def test_objectref_small_hashable_picklable(store):
    ref = store.put(rand_array(2 * MiB, 12))
    d = {ref: 1}
    assert d[ref] == 1
    data = pickle.dumps(ref, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(data) < 512, f"pickled ObjectRef is {len(data)} bytes"
    ref2 = pickle.loads(data)
    assert ref2 == ref
    assert hash(ref2) == hash(ref)
    assert np.array_equal(store.get(ref2), store.get(ref))


def test_distinct_puts_give_distinct_refs(store):
    r1 = store.put(b"same")
    r2 = store.put(b"same")
    assert r1 == r1
    assert r1 != r2  # two objects, even if their bytes are shared
    assert bytes(store.get(r1)) == bytes(store.get(r2)) == b"same"


def test_unkeyed_object_lives_while_ref_lives(make_store):
    s = make_store(warm_bytes=0)
    base = s.stats()
    ref = s.put(rand_array(4 * MiB, 13))
    st = s.stats()
    assert st["objects"] == base["objects"] + 1
    copy = pickle.loads(pickle.dumps(ref))
    del ref
    gc.collect()
    assert s.stats()["objects"] == base["objects"] + 1, "object died while a copy of its ref lived"
    assert s.get(copy).nbytes == 4 * MiB
    del copy
    gc.collect()
    st = s.stats()
    assert st["objects"] == base["objects"]
    assert st["physical_bytes"] <= base["physical_bytes"] + PAGE


def test_keyed_put_returns_ref_and_replaces(store):
    r1 = store.put({"v": 1}, key="k")
    assert isinstance(r1, dedupshm.ObjectRef)
    assert store["k"] == {"v": 1}
    r2 = store.put({"v": 2}, key="k")
    assert store["k"] == {"v": 2}
    assert len(store) == 1
    assert r1 != r2
    assert store.get(r2) == {"v": 2}
    # the old object is still reachable through the ref that keeps it alive
    assert store.get(r1) == {"v": 1}


# ================================================================ mapping protocol

def test_mapping_protocol(store):
    assert len(store) == 0
    assert list(store) == []
    store["a"] = b"1"
    store[b"b"] = {"two": 2}
    store["ключ"] = np.arange(10)
    store[b"\x00\xff\x01"] = "binary key"
    assert len(store) == 4
    keys = list(store)
    assert len(keys) == 4
    assert set(keys) == {"a", b"b", "ключ", b"\x00\xff\x01"}
    # key types are preserved
    for k in keys:
        assert type(k) in (str, bytes)
    assert "a" in store and b"b" in store and "ключ" in store and b"\x00\xff\x01" in store
    assert "zz" not in store and b"zz" not in store
    assert bytes(store["a"]) == b"1"
    assert store[b"b"] == {"two": 2}
    assert store[b"\x00\xff\x01"] == "binary key"
    del store["a"]
    assert "a" not in store
    assert len(store) == 3
    with pytest.raises(KeyError):
        store["a"]
    store.delete(b"b")
    assert b"b" not in store and len(store) == 2


def test_unkeyed_objects_are_not_keys(store):
    refs = [store.put(i) for i in range(5)]
    assert len(store) == 0
    assert list(store) == []
    store["k"] = 1
    assert len(store) == 1
    assert store.stats()["objects"] >= 6
    del refs


def test_many_keys(store):
    n = 3000
    for i in range(n):
        store[f"key-{i}"] = i
    assert len(store) == n
    assert set(store) == {f"key-{i}" for i in range(n)}
    for i in range(0, n, 97):
        assert store[f"key-{i}"] == i
    for i in range(0, n, 2):
        del store[f"key-{i}"]
    assert len(store) == n // 2
    assert set(store) == {f"key-{i}" for i in range(1, n, 2)}


def test_long_key(store):
    k = "k" * 1000
    store[k] = 5
    assert store[k] == 5
    assert list(store) == [k]


@pytest.mark.parametrize("bad", [1, 2.0, ("t",), frozenset(), bytearray(b"k")])
def test_bad_key_types(store, bad):
    with pytest.raises(TypeError):
        store[bad] = 1
    with pytest.raises(TypeError):
        store.put(1, key=bad)
    with pytest.raises(TypeError):
        store[bad]
    with pytest.raises(TypeError):
        del store[bad]
    with pytest.raises(TypeError):
        store.get(bad)
    with pytest.raises(TypeError):
        with store.create(bad, 100) as buf:
            buf[:1] = b"x"
    assert len(store) == 0


def test_none_is_not_a_key(store):
    with pytest.raises(TypeError):
        store[None] = 1
    with pytest.raises(TypeError):
        store[None]
    assert len(store) == 0


def test_missing_raises_keyerror(store):
    with pytest.raises(KeyError):
        store["nope"]
    with pytest.raises(KeyError):
        store.get("nope")
    with pytest.raises(KeyError):
        store.get(b"nope")
    with pytest.raises(KeyError):
        del store["nope"]
    with pytest.raises(KeyError):
        store.delete("nope")


def test_delete_by_ref(store):
    ref = store.put(rand_array(2 * MiB, 14), key="k")
    other = store.put(b"x")
    store.delete(ref)
    assert "k" not in store
    with pytest.raises(KeyError):
        store.get(ref)
    with pytest.raises(KeyError):
        store.delete(ref)
    assert bytes(store.get(other)) == b"x"
    unkeyed = store.put(b"y" * 10000)
    store.delete(unkeyed)
    with pytest.raises(KeyError):
        store.get(unkeyed)


def test_view_survives_delete_in_same_process(store):
    arr = rand_array(8 * MiB, 15)
    store["a"] = arr
    view = store["a"]
    del store["a"]
    store.gc()
    # churn: new values must not reuse the pages under the view
    for i in range(4):
        store[f"n{i}"] = rand_array(8 * MiB, 100 + i)
        del store[f"n{i}"]
    store.gc()
    assert np.array_equal(view, arr)


# ================================================================ create()

def test_create_publishes_on_normal_exit(store):
    n = 3 * MiB + 100
    src = rand_array(n, 16)
    with store.create("c", n) as buf:
        assert isinstance(buf, memoryview)
        assert not buf.readonly
        assert buf.nbytes == n
        assert "c" not in store  # invisible until the block ends
        buf[:] = src.tobytes()
    assert "c" in store
    out = store["c"]
    assert isinstance(out, memoryview) and out.readonly
    assert out.tobytes() == src.tobytes()
    assert len(store) == 1


def test_create_small(store):
    with store.create("s", 10) as buf:
        buf[:] = b"0123456789"
    assert bytes(store["s"]) == b"0123456789"


def test_create_discarded_on_exception(store):
    before = store.stats()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.create("c", 2 * MiB) as buf:
            buf[:4] = b"abcd"
            raise Boom()
    assert "c" not in store
    with pytest.raises(KeyError):
        store["c"]
    after = store.stats()
    assert after["objects"] == before["objects"]
    assert after["physical_bytes"] == before["physical_bytes"]
    assert after["logical_bytes"] == before["logical_bytes"]


def test_create_replaces_key(store):
    store["c"] = b"old"
    with store.create("c", 5) as buf:
        buf[:] = b"newer"
    assert bytes(store["c"]) == b"newer"
    assert len(store) == 1


def test_create_dedups_against_existing(store):
    src = rand_array(4 * MiB, 17)
    store["a"] = src
    p0 = store.stats()["physical_bytes"]
    with store.create("b", src.nbytes) as buf:
        buf[:] = src.tobytes()
    st = store.stats()
    assert st["physical_bytes"] - p0 <= 2 * PAGE, \
        f"create() of identical bytes added {st['physical_bytes'] - p0} physical bytes"


@pytest.mark.parametrize("n", [-1])
def test_create_bad_size(store, n):
    with pytest.raises(ValueError):
        with store.create("c", n):
            pass


# ================================================================ writable views

def test_writable_array_is_private_copy_on_write(store):
    arr = rand_array(16 * MiB, 18)
    store["a"] = arr
    ro = store["a"]
    w1 = store.get("a", writable=True)
    w2 = store.get("a", writable=True)
    assert isinstance(w1, np.ndarray) and w1.flags.writeable
    assert np.array_equal(w1, arr)
    w1[0] = 0
    w1[5 * MiB] ^= 0xFF
    w1[-1] = 7
    assert w1[5 * MiB] == arr[5 * MiB] ^ 0xFF
    # no other view, and not the stored object, changed
    assert np.array_equal(ro, arr)
    assert np.array_equal(w2, arr)
    assert np.array_equal(store["a"], arr)
    assert np.array_equal(store.get("a", writable=True), arr)


def test_writable_view_copies_only_written_pages(store):
    arr = rand_array(32 * MiB, 19)
    store["a"] = arr
    del arr
    gc.collect()
    before = memory_reading()
    w = store.get("a", writable=True)
    s = int(w.sum(dtype=np.uint64))  # read every page
    for i in range(8):
        w[i * 4 * MiB] = 1           # write 8 pages
    after = memory_reading()
    anon = after["anon"] - before["anon"]
    assert s > 0
    assert anon < 4 * MiB, f"writable view used {anon / MiB:.1f} MiB of private memory"


def test_writable_bytes(store):
    store["b"] = b"abcdef" * 1000
    w = store.get("b", writable=True)
    assert isinstance(w, memoryview)
    assert not w.readonly
    w[0:3] = b"XYZ"
    assert bytes(w[:6]) == b"XYZdef"
    assert bytes(store["b"][:6]) == b"abcdef"


def test_writable_dict_of_arrays(store):
    a = np.arange(1_000_000, dtype=np.int64)
    store["d"] = {"a": a, "x": 1}
    out = store.get("d", writable=True)
    assert out["a"].flags.writeable
    out["a"][:10] = -1
    assert np.array_equal(store["d"]["a"], a)
    assert store["d"]["x"] == 1


# ================================================================ stats

def test_stats_fields_and_values(store):
    st = store.stats()
    for k in ("objects", "logical_bytes", "physical_bytes", "pages_shared", "pages_sharing",
              "dedup_ratio", "metadata_bytes"):
        assert k in st, k
    assert st["objects"] == 0
    arr = rand_array(8 * MiB, 20)
    store["a"] = arr
    store["b"] = arr
    st = store.stats()
    assert st["objects"] == 2
    assert 2 * arr.nbytes <= st["logical_bytes"] <= 2 * arr.nbytes + 64 * 1024
    assert arr.nbytes <= st["physical_bytes"] <= arr.nbytes + 64 * 1024
    assert st["dedup_ratio"] == pytest.approx(st["logical_bytes"] / st["physical_bytes"], rel=1e-6)
    assert st["pages_shared"] >= arr.nbytes // PAGE
    assert st["pages_sharing"] >= arr.nbytes // PAGE


def test_gc_on_clean_store_changes_nothing(store):
    store["a"] = rand_array(2 * MiB, 21)
    keep = store.put(b"k" * 5000)
    before = store.stats()
    store.gc()
    after = store.stats()
    for k in ("objects", "logical_bytes", "physical_bytes"):
        assert after[k] == before[k], k
    assert bytes(store.get(keep)) == b"k" * 5000
