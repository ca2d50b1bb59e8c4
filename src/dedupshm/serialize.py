"""Turning values into (descriptor, buffers) and back, zero-copy.

A descriptor is a small msgpack map saying how to rebuild the value from
its buffers.  The C core stores the buffers one after the other (16-byte
aligned); values up to DS_SMALL_MAX bytes are packed in the index and
copied out on read, larger ones are mapped zero-copy.

What comes back is what went in, for every size: a numpy array keeps its
dtype (structured too), shape and memory order (C or Fortran; other
layouts come back C-contiguous); a memoryview keeps its format and shape;
bytes and bytearray come back as a flat memoryview of their bytes.  The
buffers the decoder gets are read-only for a plain ``get`` and writable
(private) for ``get(writable=True)``, and so is every array, memoryview and
out-of-band buffer rebuilt over them.

Kinds:
  ``nd``  a numpy array (dtype as ``dt`` string, or pickled as ``dp`` when
          a string cannot say it, e.g. structured; shape, order); one buffer
  ``b``   a bytes-like value; one buffer, returned as a flat memoryview
  ``mv``  a memoryview with a format or shape: one buffer, cast back
          (``f``), or rebuilt through numpy (``dt``/``dp``) for formats
          memoryview.cast cannot make
  ``pk``  anything else: pickle protocol 5 with every buffer out of band;
          buffers of at least ``OOB_MIN`` bytes are stored as buffers of
          their own, smaller ones packed into one shared buffer; ``bt``
          says where each is ([buffer index, offset, length] each); the
          pickle stream inline or, when large, as the last buffer
"""
from __future__ import annotations

import pickle
from typing import Any, Optional, Sequence, cast

import msgpack
import numpy as np

from ._typing import Buffer

#: (descriptor bytes, contiguous buffers): what the store keeps of a value.
Encoded = tuple[bytes, list[memoryview]]

OOB_MIN = 4096
#: Pickle streams up to this size ride in the descriptor (small values stay
#: packed); longer ones are stored as a buffer of their own.
INLINE_PICKLE_MAX = 1024
BYTES_DESC: bytes = msgpack.packb({"k": "b"}, use_bin_type=True)
_ALIGN = 16


def _contiguous_bytes(mv: Buffer) -> memoryview:
    mv = memoryview(mv)
    if mv.c_contiguous:
        if mv.format == "B" and mv.ndim == 1:
            return mv
        if mv.nbytes and 0 not in (mv.shape or ()):
            return mv.cast("B")
    return memoryview(mv.tobytes())


def _dtype_desc(desc: dict[str, Any], dt: np.dtype[Any]) -> None:
    """Record dtype dt in desc: as its string when that round-trips."""
    s = dt.str
    try:
        same = dt.fields is None and dt.subdtype is None and np.dtype(s) == dt
    except TypeError:
        same = False
    if same:
        desc["dt"] = s
    else:
        desc["dp"] = pickle.dumps(dt, protocol=5)


def _dtype_of(desc: dict[str, Any]) -> np.dtype[Any]:
    if "dt" in desc:
        return cast("np.dtype[Any]", np.dtype(desc["dt"]))
    dt = pickle.loads(desc["dp"])
    if not isinstance(dt, np.dtype):
        raise ValueError("corrupt descriptor: dp is not a dtype")
    return dt


def _array_bytes(arr: np.ndarray[Any, Any]) -> memoryview:
    """A flat byte view of a C- or F-contiguous array (no copy)."""
    if arr.nbytes == 0:
        return memoryview(b"")
    flat = arr.reshape(-1, order="A")
    return memoryview(flat.view(np.uint8))


_castable: dict[str, bool] = {}


def _can_cast(fmt: str) -> bool:
    """Whether memoryview.cast can make format fmt (native single characters)."""
    ok = _castable.get(fmt)
    if ok is None:
        try:
            memoryview(bytes(64)).cast(fmt)  # type: ignore[call-overload]
            ok = True
        except (ValueError, TypeError):
            ok = False
        if len(_castable) < 256:
            _castable[fmt] = ok
    return ok


def _encode_memoryview(mv: memoryview) -> Encoded:
    if mv.format == "B" and mv.ndim == 1:
        return BYTES_DESC, [_contiguous_bytes(mv)]
    shape = list(mv.shape or ())
    if _can_cast(mv.format) and 0 not in shape:
        desc = {"k": "mv", "f": mv.format, "sh": shape}
        return msgpack.packb(desc, use_bin_type=True), [_contiguous_bytes(mv)]
    try:
        arr = np.asarray(mv)
    except (ValueError, TypeError, NotImplementedError):
        arr = None
    if arr is None or arr.dtype.hasobject or arr.dtype.itemsize == 0:
        return BYTES_DESC, [_contiguous_bytes(mv)]         # a format nobody can rebuild
    arr = np.ascontiguousarray(arr)
    desc = {"k": "mv", "sh": shape}
    _dtype_desc(desc, arr.dtype)
    return msgpack.packb(desc, use_bin_type=True), [_array_bytes(arr)]


def encode(value: Any) -> Encoded:
    """Return (descriptor bytes, list of contiguous buffers)."""
    if type(value) is np.ndarray and not value.dtype.hasobject and value.dtype.itemsize:
        if value.flags.c_contiguous:
            order, arr = "C", value
        elif value.flags.f_contiguous:
            order, arr = "F", value
        else:
            order, arr = "C", np.ascontiguousarray(value)
        desc = {"k": "nd", "sh": list(arr.shape), "o": order}
        _dtype_desc(desc, arr.dtype)
        return msgpack.packb(desc, use_bin_type=True), [_array_bytes(arr)]
    if isinstance(value, memoryview):
        return _encode_memoryview(value)
    if isinstance(value, (bytes, bytearray)):
        return BYTES_DESC, [_contiguous_bytes(value)]
    return _encode_pickle(value)


#: Past this many small buffers in one pickle their table would outgrow the
#: descriptor: they go in-band (and arrays among them come back as copies).
MAX_PACKED_BUFFERS = 1_000_000


def _encode_pickle(value: Any, pack_small: bool = True) -> Encoded:
    bufs: list[memoryview] = []          # what the store keeps: large buffers, [small pack], [stream]
    where: list[int] = []         # per pickle buffer, in order: buffer index, offset, length
    small: list[tuple[int, int, memoryview]] = []         # (position in where, raw) of buffers packed together
    small_len = 0

    def oob(pb: pickle.PickleBuffer) -> bool:
        nonlocal small_len
        raw = pb.raw()
        n = raw.nbytes
        if n >= OOB_MIN:
            where.extend((len(bufs), 0, n))
            bufs.append(raw)
        elif not pack_small:
            return True
        else:
            small_len = (small_len + _ALIGN - 1) // _ALIGN * _ALIGN
            small.append((len(where), small_len, raw))
            where.extend((-1, small_len, n))
            small_len += n
        return False

    try:
        stream = pickle.dumps(value, protocol=5, buffer_callback=oob)
    except Exception as e:  # noqa: BLE001 - any pickling failure is the caller's value
        raise TypeError(f"cannot store {type(value).__name__}: {e}") from e
    if len(small) > MAX_PACKED_BUFFERS:
        return _encode_pickle(value, pack_small=False)
    if small:
        pack = bytearray(small_len)
        for pos, off, raw in small:
            pack[off:off + raw.nbytes] = raw
            where[pos] = len(bufs)
        bufs.append(memoryview(pack))
    if not bufs:
        # an empty buffer: the decoder tells a plain get from a writable one
        # by its buffers, and a value with none would come back writable
        bufs.append(memoryview(b""))
    desc = {"k": "pk", "nb": len(bufs), "bt": where}
    if len(stream) <= INLINE_PICKLE_MAX:
        desc["p"] = stream
    else:
        bufs.append(memoryview(stream))
    return msgpack.packb(desc, use_bin_type=True), bufs


def _readonly(buffers: Sequence[memoryview], writable: Optional[bool]) -> bool:
    if writable is not None:
        return not writable
    return bool(buffers) and buffers[0].readonly


def decode(desc_bytes: bytes, buffers: Sequence[memoryview],
           writable: Optional[bool] = None) -> Any:
    """Rebuild a value from its descriptor and buffers (memoryviews).

    ``writable``: whether the caller asked for writable results (None:
    as writable as the buffers are)."""
    if desc_bytes == BYTES_DESC:
        return buffers[0]
    desc = msgpack.unpackb(desc_bytes, raw=False)
    kind = desc["k"]
    if kind == "nd":
        dt = _dtype_of(desc)
        shape = tuple(desc["sh"])
        count = 1
        for d in shape:
            count *= d
        arr = np.frombuffer(buffers[0], dtype=dt, count=count)
        return arr.reshape(shape, order=desc["o"])
    if kind == "b":
        return buffers[0]
    if kind == "mv":
        shape = tuple(desc["sh"])
        if "f" in desc:
            return buffers[0].cast("B").cast(desc["f"], shape)
        dt = _dtype_of(desc)
        count = 1
        for d in shape:
            count *= d
        return memoryview(np.frombuffer(buffers[0], dtype=dt, count=count).reshape(shape))
    if kind == "pk":
        nb = desc["nb"]
        stream = desc["p"] if "p" in desc else buffers[nb]
        bt = desc.get("bt")
        if bt is None:                                   # written before "bt" existed
            oob = buffers[:nb]
        else:
            oob = [buffers[bt[i]][bt[i + 1]:bt[i + 1] + bt[i + 2]] for i in range(0, len(bt), 3)]
        try:
            value = pickle.loads(stream, buffers=oob)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stored value cannot be unpickled here: {e!r}") from e
        if isinstance(value, np.ndarray) and value.flags.writeable and _readonly(buffers, writable):
            try:
                value.flags.writeable = False      # e.g. an object array: no buffer of ours
            except ValueError:
                pass
        return value
    raise ValueError(f"unknown descriptor kind {kind!r}")
