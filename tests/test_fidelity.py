"""Issue 9 #6: what comes back is what went in, for every size.

Values up to 2 KiB are packed in the index and copied out on read; larger
ones are mapped zero-copy.  Either way a get returns the same dtype, shape,
memory order and format, read-only for a plain get and writable (private)
for ``get(writable=True)``."""
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SMALL_MAX = 2048

STRUCT = np.dtype([("a", "<i4"), ("b", "<f8"), ("c", "S3")])
ALIGNED = np.dtype({"names": ["x", "y"], "formats": ["u1", "<f8"]}, align=True)
SUBARRAY = np.dtype([("v", "<f4", (3,)), ("n", "<u2")])
DTYPES = [np.dtype(d) for d in ("u1", "i1", "<i2", ">i4", "<i8", "<f2", "<f4", ">f8", "<c16",
                                "?", "<M8[s]", "<m8[ms]", "<U3", "S5", "V6")] + \
    [STRUCT, ALIGNED, SUBARRAY]


def _bytes_of(a):
    return np.ascontiguousarray(a).tobytes()


def _same(r, a):
    """Equal contents (field by field: copies of a structured array need not
    keep the padding bytes between fields)."""
    if a.dtype.fields:
        return all(_same(r[f], a[f]) for f in a.dtype.names)
    return _bytes_of(r) == _bytes_of(a)


def check_array(s, a):
    ref = s.put(a)
    for writable in (False, True):
        r = s.get(ref, writable=writable)
        assert type(r) is np.ndarray
        assert r.dtype == a.dtype and r.shape == a.shape
        assert _same(r, a)
        assert r.flags.writeable == writable, (a.dtype, a.shape, a.nbytes, writable)
        if a.flags.f_contiguous and not a.flags.c_contiguous:
            assert r.flags.f_contiguous
        else:
            assert r.flags.c_contiguous
        if writable and r.size:
            r.reshape(-1, order="A").view(np.uint8)[:1] ^= 0xFF   # private
    assert _same(s.get(ref), a)


def check_memoryview(s, m):
    ref = s.put(m)
    for writable in (False, True):
        r = s.get(ref, writable=writable)
        assert isinstance(r, memoryview)
        assert r.shape == m.shape and r.ndim == m.ndim
        assert r.readonly == (not writable), (m.format, m.shape, writable)
        assert r.tobytes() == m.tobytes()
        try:
            same_format = np.asarray(r).dtype == np.asarray(m).dtype
        except (ValueError, TypeError, NotImplementedError):
            same_format = False
        assert r.format == m.format or same_format, (r.format, m.format)


@pytest.fixture
def s(make_store):
    return make_store(capacity="256MiB")


# ---------------------------------------------------------------- the reported cases

def test_small_structured_array_is_read_only(s):
    a = np.zeros(3, dtype=STRUCT)
    a["a"] = [1, 2, 3]
    r = s.get(s.put(a))
    assert not r.flags.writeable
    with pytest.raises(ValueError):
        r["a"][0] = 5
    assert r.dtype == STRUCT and r["a"].tolist() == [1, 2, 3]
    assert s.get(s.put(a), writable=True).flags.writeable


def test_typed_memoryview_keeps_format_and_shape(s):
    m = memoryview(np.arange(12, dtype=np.int32).reshape(3, 4))
    r = s.get(s.put(m))
    assert (r.format, r.shape, r.readonly) == (m.format, (3, 4), True)
    assert r.tolist() == m.tolist()
    w = s.get(s.put(m), writable=True)
    assert (w.format, w.shape, w.readonly) == (m.format, (3, 4), False)


# ---------------------------------------------------------------- every kind, both sides of 2 KiB

SIZES = [0, 8, 100, SMALL_MAX - 200, SMALL_MAX - 16, SMALL_MAX, SMALL_MAX + 16, 3000, 5000,
         70_000]


def _n(nbytes, dt):
    return max(nbytes // dt.itemsize, 0)


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_arrays_round_trip(s, dt, nbytes):
    rng = np.random.default_rng(nbytes)
    n = _n(nbytes, dt)
    a = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt) if n else np.zeros(0, dt)
    if dt.kind in "fc":
        a = np.where(np.isnan(a), 0, a).astype(dt)
    check_array(s, a)
    if n >= 6:
        check_array(s, a[: n // 6 * 6].reshape(2, 3, -1))                  # C, 3-d
        check_array(s, np.asfortranarray(a[: n // 6 * 6].reshape(6, -1)))  # Fortran
        check_array(s, a[::2])                                               # non-contiguous
    check_array(s, a[:1].reshape(()) if n else np.zeros((), dt))             # 0-d


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("fmt", ["B", "b", "i", "I", "q", "d", "f", "?", "e", "<i", ">i", "Zd",
                                 "struct"])
def test_memoryviews_round_trip(s, fmt, nbytes):
    dt = STRUCT if fmt == "struct" else np.dtype(fmt.replace("Zd", "c16"))
    n = _n(nbytes, dt)
    a = np.zeros(n, dt)
    a.view(np.uint8)[:] = np.arange(a.nbytes, dtype=np.uint64) % 251
    if fmt in ("e", "Zd", "f", "d"):
        a = np.zeros(n, dt) + np.arange(n)
    check_memoryview(s, memoryview(a))
    if n >= 4:
        check_memoryview(s, memoryview(a[: n // 4 * 4].reshape(4, -1)))
        check_memoryview(s, memoryview(a)[::2])                             # non-contiguous
    check_memoryview(s, memoryview(a[:0].reshape(0, 3)) if fmt != "B" else memoryview(a[:0]))
    if n:
        check_memoryview(s, memoryview(a[:1].reshape(())))                   # 0-d


@pytest.mark.parametrize("nbytes", SIZES)
def test_bytes_and_bytearray_round_trip(s, nbytes):
    data = bytes(range(256)) * (nbytes // 256) + b"x" * (nbytes % 256)
    for value in (data, bytearray(data)):
        ref = s.put(value)
        for writable in (False, True):
            r = s.get(ref, writable=writable)
            assert isinstance(r, memoryview) and r.format == "B" and r.ndim == 1
            assert r.readonly == (not writable) and bytes(r) == data


class Box:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("nbytes", SIZES)
def test_pickled_objects_with_buffers_round_trip(s, nbytes):
    rng = np.random.default_rng(7)
    big = rng.random(max(nbytes // 8, 1))
    value = {"small": np.arange(3, dtype=np.int16), "big": big,
             "box": Box(arr=np.asfortranarray(big[: len(big) // 2 * 2].reshape(2, -1)),
                        st=np.zeros(2, STRUCT)),
             "pb": pickle.PickleBuffer(bytearray(b"abc")), "text": "t", "n": nbytes}
    ref = s.put(value)
    for writable in (False, True):
        r = s.get(ref, writable=writable)
        assert r["text"] == "t" and r["n"] == nbytes
        arrays = [(r["small"], value["small"]), (r["big"], big),
                  (r["box"].arr, value["box"].arr), (r["box"].st, value["box"].st)]
        for got, want in arrays:
            assert got.dtype == want.dtype and got.shape == want.shape
            assert _same(got, want)
            assert got.flags.writeable == writable, (got.dtype, got.shape, writable)
        assert r["box"].arr.flags.f_contiguous
        assert bytes(r["pb"]) == b"abc" and memoryview(r["pb"]).readonly == (not writable)


@pytest.mark.parametrize("writable", [False, True])
def test_object_arrays_follow_writable(s, writable):
    a = np.array([1, "x", None, (2, 3)], dtype=object)
    r = s.get(s.put(a), writable=writable)
    assert r.tolist() == a.tolist() and r.flags.writeable == writable


# ---------------------------------------------------------------- random shapes and sizes

@st.composite
def arrays(draw):
    dt = draw(st.sampled_from(DTYPES))
    nbytes = draw(st.integers(0, 3 * SMALL_MAX))
    n = nbytes // dt.itemsize
    ndim = draw(st.integers(0, 3))
    if ndim == 0:
        shape = ()
    else:
        dims = [draw(st.integers(1, 4)) for _ in range(ndim - 1)]
        inner = 1
        for d in dims:
            inner *= d
        shape = tuple(dims) + (max(n // inner, 0),)
    count = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=count * dt.itemsize, max_size=count * dt.itemsize))
    a = np.frombuffer(raw, dtype=dt).reshape(shape).copy() if count else np.zeros(shape, dt)
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        a = np.asfortranarray(a)
    elif layout == "strided" and a.ndim and a.shape[-1] > 1:
        a = a[..., ::2]
    return a


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(a=arrays())
def test_random_arrays_round_trip(s, a):
    check_array(s, a)
    if a.dtype.kind not in "OVMm" and a.dtype.fields is None:
        check_memoryview(s, memoryview(np.ascontiguousarray(a)))


def test_many_small_buffers_still_round_trip(s, monkeypatch):
    from dedupshm import serialize
    value = [np.arange(i % 7 + 1, dtype=np.int32) for i in range(50)]
    r = s.get(s.put(value))
    assert [a.tolist() for a in r] == [a.tolist() for a in value]
    assert not any(a.flags.writeable for a in r)
    monkeypatch.setattr(serialize, "MAX_PACKED_BUFFERS", 10)     # past it: in-band
    r = s.get(s.put(value))
    assert [a.tolist() for a in r] == [a.tolist() for a in value]
