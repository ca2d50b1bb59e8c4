"""safetensors files loaded into a store once per machine.

``dedupshm.safetensors.load_file(path, store)`` is ``safetensors.torch.
load_file(path)`` with every tensor backed by the store: the first process
of the store to load a file reads each tensor straight from the file into
a store buffer (``os.preadv``; peak memory: the store's copy plus one
tensor), every later load of the same file by any process maps the stored
tensors without reading it (see dedupshm._weights for how a file is
recognised), and equal pages of different files (fine-tunes of one base
model) are stored once.

The format is parsed here (8-byte little-endian header length, a JSON
header, the data); the ``safetensors`` package is not needed to load.
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Literal, Optional, Union, overload

from . import _weights
from ._weights import WeightsFileError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ._weights import PathArg, StrPath
    from .store import Store

    #: a tensor in the header: (name, dtype code, shape, start, end)
    _Entry = tuple[str, str, list[int], int, int]

__all__ = ["load_file", "forget", "WeightsFileError"]

#: safetensors dtype -> (torch dtype name, numpy dtype str or None, size)
DTYPES = {
    "F64": ("float64", "<f8", 8), "F32": ("float32", "<f4", 4), "F16": ("float16", "<f2", 2),
    "BF16": ("bfloat16", None, 2), "I64": ("int64", "<i8", 8), "I32": ("int32", "<i4", 4),
    "I16": ("int16", "<i2", 2), "I8": ("int8", "|i1", 1), "U64": ("uint64", "<u8", 8),
    "U32": ("uint32", "<u4", 4), "U16": ("uint16", "<u2", 2), "U8": ("uint8", "|u1", 1),
    "BOOL": ("bool", "|b1", 1), "F8_E4M3": ("float8_e4m3fn", None, 1),
    "F8_E5M2": ("float8_e5m2", None, 1), "C64": ("complex64", "<c8", 8),
}
#: the reference implementation's limit on the header
MAX_HEADER = 100_000_000


def parse_header(f: BinaryIO, path: str, size: int) -> tuple[list[_Entry], int]:
    """[(name, dtype code, shape, start, end)] sorted by start, and the
    offset of the data; WeightsFileError for anything malformed."""
    def bad(why: str) -> WeightsFileError:
        return WeightsFileError(f"{path}: not a valid safetensors file: {why}")
    head = os.pread(f.fileno(), 8, 0)
    if len(head) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} does not fit in the file ({size} bytes)")
    raw = os.pread(f.fileno(), n, 8)
    if len(raw) < n:
        raise bad("truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entries: list[_Entry] = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict):
            raise bad(f"entry {name!r} is not an object")
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in DTYPES:
            raise bad(f"{name!r}: unknown dtype {code!r}")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                           for d in shape)):
            raise bad(f"{name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"{name!r}: bad data_offsets {offs!r}")
        count = 1
        for d in shape:
            count *= d
        if offs[1] - offs[0] != count * DTYPES[code][2]:
            raise bad(f"{name!r}: {offs[1] - offs[0]} bytes for shape {shape} of {code}")
        entries.append((name, code, shape, offs[0], offs[1]))
    entries.sort(key=lambda x: (x[3], x[4]))
    end = 0
    for name, _, _, start, stop in entries:
        if start < end:
            raise bad(f"{name!r} overlaps the tensor before it")
        end = stop
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "has bytes past its last tensor"
        raise bad(f"{what}: data should end at byte {8 + n + end}, the file has {size}")
    return entries, 8 + n


def _read(path: str) -> Callable[[io.FileIO, _weights.Writer], dict[str, object]]:
    def read(f: io.FileIO, writer: _weights.Writer) -> dict[str, object]:
        size = os.fstat(f.fileno()).st_size
        entries, base = parse_header(f, path, size)
        tensors: list[tuple[str, str, list[int], int]] = []
        for name, code, shape, start, stop in entries:
            def fill(buf: memoryview, off: int = base + start) -> None:
                got = 0
                while got < len(buf):
                    k = os.preadv(f.fileno(), [buf[got:]], off + got)
                    if k <= 0:
                        raise WeightsFileError(f"{path}: truncated while reading (file changed?)")
                    got += k
            idx = writer.buffer(stop - start, fill)
            tensors.append((name, code, shape, idx))
        return {"tensors": tensors}
    return read


@overload
def load_file(path: PathArg, store: Union[Store, str], *, framework: Literal["pt"] = "pt",
              verify: str = "sample") -> dict[str, torch.Tensor]: ...
@overload
def load_file(path: PathArg, store: Union[Store, str], *, framework: Literal["np"],
              verify: str = "sample") -> dict[str, np.ndarray[Any, Any]]: ...
@overload
def load_file(path: PathArg, store: Union[Store, str], *, framework: str = "pt",
              verify: str = "sample") -> Union[dict[str, torch.Tensor],
                                                dict[str, np.ndarray[Any, Any]]]: ...
def load_file(path: PathArg, store: Union[Store, str], *, framework: str = "pt",
              verify: str = "sample") -> Union[dict[str, torch.Tensor],
                                                dict[str, np.ndarray[Any, Any]]]:
    """The tensors of a safetensors file, as a dict name -> tensor, backed
    by the store (see the module docstring).  ``framework="pt"``: torch
    tensors, private copy-on-write mappings (writes stay in the writing
    process); ``"np"``: read-only numpy arrays.  A truncated or corrupt
    file raises WeightsFileError (a ValueError) and leaves nothing in the
    store."""
    if framework not in ("pt", "np"):
        raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}")
    store = _weights.store_of(store)
    path = os.fsdecode(path)
    meta, bufs, _ = _weights.load(store, path, "safetensors", _read(path), verify=verify,
                                  writable=framework == "pt")
    if framework == "pt":
        import torch
        out: dict[str, torch.Tensor] = {}
        for name, code, shape, idx in meta["tensors"]:
            dtype = getattr(torch, DTYPES[code][0])
            buf = bufs[idx]
            if len(buf) == 0:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                out[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape)
        return out
    import numpy as np
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for name, code, shape, idx in meta["tensors"]:
        npdt = DTYPES[code][1]
        if npdt is None:
            raise TypeError(f"{name!r}: numpy has no {code} dtype (use framework='pt')")
        arrays[name] = np.frombuffer(bufs[idx], dtype=npdt).reshape(shape)
    return arrays


def forget(path: Optional[StrPath], store: Store) -> int:
    """Delete what ``store`` holds of files loaded from ``path`` (None:
    of every file); see dedupshm.torch.forget."""
    return _weights.forget(store, path)
