"""Turning values into (descriptor, buffers) and back, zero-copy.

A descriptor is a small msgpack map saying how to rebuild the value from
its buffers.  Buffers are stored page-aligned (large values) so identical
arrays dedup page for page wherever they appear, including inside pickles.

Kinds:
  ``nd``  a numpy array (dtype, shape, order); one buffer
  ``b``   a bytes-like value; one buffer, returned as a memoryview
  ``pk``  anything else: pickle protocol 5, out-of-band buffers for every
          buffer of at least ``OOB_MIN`` bytes, the pickle stream inline
          or, when large, as the last buffer
"""
import pickle

import msgpack
import numpy as np

OOB_MIN = 4096
#: Pickle streams up to this size ride in the descriptor (small values stay
#: packed); longer ones are stored as a buffer of their own.
BYTES_DESC = msgpack.packb({"k": "b"}, use_bin_type=True)
INLINE_PICKLE_MAX = 1024


def _contiguous_bytes(mv):
    mv = memoryview(mv)
    if mv.c_contiguous:
        return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    return memoryview(mv.tobytes())


def encode(value):
    """Return (descriptor bytes, list of contiguous buffers)."""
    if type(value) is np.ndarray and _plain_dtype(value.dtype):
        if value.flags.c_contiguous:
            order, arr = "C", value
        elif value.flags.f_contiguous:
            order, arr = "F", value
        else:
            order, arr = "C", np.ascontiguousarray(value)
        desc = {"k": "nd", "dt": arr.dtype.str,
                "sh": list(arr.shape), "o": order}
        buf = arr.reshape(-1, order="A") if arr.ndim != 1 else arr
        mv = memoryview(buf.view(np.uint8) if buf.size else b"")
        return msgpack.packb(desc, use_bin_type=True), [mv.cast("B") if mv.ndim != 1 else mv]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BYTES_DESC, [_contiguous_bytes(value)]
    bufs = []

    def oob(pb):
        raw = pb.raw()
        if raw.nbytes < OOB_MIN:
            return True                    # keep small buffers in-band
        bufs.append(raw)
        return False

    try:
        stream = pickle.dumps(value, protocol=5, buffer_callback=oob)
    except Exception as e:  # noqa: BLE001 - any pickling failure is the caller's value
        raise TypeError(f"cannot store {type(value).__name__}: {e}") from e
    desc = {"k": "pk", "nb": len(bufs)}
    if len(stream) <= INLINE_PICKLE_MAX:
        desc["p"] = stream
    else:
        bufs.append(memoryview(stream))
    return msgpack.packb(desc, use_bin_type=True), bufs


def decode(desc_bytes, buffers):
    """Rebuild a value from its descriptor and buffers (memoryviews)."""
    if desc_bytes == BYTES_DESC:
        return buffers[0]
    desc = msgpack.unpackb(desc_bytes, raw=False)
    kind = desc["k"]
    if kind == "nd":
        dt = np.dtype(desc["dt"])
        shape = tuple(desc["sh"])
        count = 1
        for d in shape:
            count *= d
        arr = np.frombuffer(buffers[0], dtype=dt, count=count)
        return arr.reshape(shape, order=desc["o"])
    if kind == "b":
        return buffers[0]
    if kind == "pk":
        nb = desc["nb"]
        stream = desc["p"] if "p" in desc else buffers[nb]
        try:
            return pickle.loads(stream, buffers=buffers[:nb])
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stored value cannot be unpickled here: {e!r}") from e
    raise ValueError(f"unknown descriptor kind {kind!r}")


def _plain_dtype(dt):
    """dtypes that dtype.str round-trips; others (structured, object) pickle."""
    return not dt.hasobject and dt.fields is None and dt.subdtype is None
