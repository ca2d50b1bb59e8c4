"""``.npy`` / ``.npz`` files loaded into a store once per machine.

``dedupshm.numpy.load(path, store)`` is ``numpy.load(path)`` with the data
in the store: the first process of the store to load a file reads each
array straight into a store buffer (peak memory: the store's copy plus one
array; ``.npz`` members are read in 4 MiB pieces, compressed or not, and
their CRC is checked), every later load of the same file by any process
maps the stored arrays without reading it (see dedupshm._weights), and
equal pages of different files are stored once.  Arrays are read-only
views of the shared pages.  Object arrays (which need pickle) are refused.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union, cast

import numpy as np

from . import _weights
from ._weights import WeightsFileError

if TYPE_CHECKING:
    from ._weights import PathArg, StrPath
    from .store import Store

    #: what an array's header is read from: the .npy file, or a .npz member
    _Source = Union[io.FileIO, zipfile.ZipExtFile]
    #: numpy's description of a structured dtype (dtype.descr)
    _Descr = list[Union[tuple[str, str], tuple[str, str, tuple[int, ...]]]]
    #: an array in the manifest: (shape, fortran order, dtype str or descr,
    #: index of its buffer)
    _Entry = tuple[list[int], bool, Union[str, _Descr], int]

__all__ = ["load", "forget", "WeightsFileError"]

CHUNK = 4 << 20


def _header(fp: _Source, path: str) -> tuple[list[int], bool, Union[str, _Descr], int]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:                           # private, not in numpy's stubs
            shape, fortran, dtype = cast(Any, fmt)._read_array_header(fp, version)
    except (ValueError, EOFError, SyntaxError, TypeError) as e:
        raise WeightsFileError(f"{path}: not a valid .npy array: {e}") from None
    if dtype.hasobject:
        raise WeightsFileError(f"{path}: an object array needs pickle; use numpy.load("
                               f"allow_pickle=True) for trusted files")
    count = 1
    for d in shape:
        count *= d
    return list(shape), bool(fortran), dtype.str if dtype.fields is None else dtype.descr, \
        count * dtype.itemsize


def _fill_from(fp: _Source, path: str, what: str) -> Callable[[memoryview], None]:
    def fill(buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            try:
                k = fp.readinto(buf[got:got + CHUNK])
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
                raise WeightsFileError(f"{path}: {what}: {e}") from None
            if not k:
                raise WeightsFileError(f"{path}: {what} is truncated")
            got += k
    return fill


def _read_npy(fp: _Source, path: str, writer: _weights.Writer, what: str) -> _Entry:
    shape, fortran, dt, nbytes = _header(fp, path)
    idx = writer.buffer(nbytes, _fill_from(fp, path, what))
    return (shape, fortran, dt, idx)


def _read(path: str) -> Callable[[io.FileIO, _weights.Writer], dict[str, object]]:
    def read(f: io.FileIO, writer: _weights.Writer) -> dict[str, object]:
        magic = os.pread(f.fileno(), 6, 0)
        if magic == b"\x93NUMPY":
            entry = _read_npy(f, path, writer, "array data")
            if f.read(1):
                raise WeightsFileError(f"{path}: bytes past the end of the array")
            return {"npy": entry}
        if magic[:4] != b"PK\x03\x04" and magic[:4] != b"PK\x05\x06":
            raise WeightsFileError(f"{path}: neither a .npy nor a .npz file")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise WeightsFileError(f"{path}: not a valid .npz archive: {e}") from None
        arrays: dict[str, _Entry] = {}
        with zf:
            for info in zf.infolist():
                name = info.filename
                try:
                    mf = cast(zipfile.ZipExtFile, zf.open(info))  # ZipFile.open in "r" mode
                except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError) as e:
                    raise WeightsFileError(f"{path}: member {name!r}: {e}") from None
                with mf:
                    entry = _read_npy(mf, f"{path}[{name}]", writer, "member data")
                    try:
                        extra = mf.read(1)        # reaches the end: zipfile checks the CRC
                    except (zipfile.BadZipFile, EOFError, OSError) as e:
                        raise WeightsFileError(f"{path}: member {name!r}: {e}") from None
                    if extra:
                        raise WeightsFileError(f"{path}: member {name!r}: bytes past its array")
                key = name[:-4] if name.endswith(".npy") else name
                arrays[key] = entry
        return {"npz": arrays}
    return read


def _array(entry: Sequence[Any], bufs: Sequence[memoryview]) -> np.ndarray[Any, Any]:
    shape, fortran, dt, idx = entry
    dtype = np.dtype(dt if isinstance(dt, str) else [tuple(x) for x in dt])
    count = 1
    for d in shape:
        count *= d
    a = np.frombuffer(bufs[idx], dtype=dtype, count=count)
    return a.reshape(shape, order="F" if fortran else "C")


def load(path: PathArg, store: Union[Store, str], *,
         verify: str = "sample") -> Union[np.ndarray[Any, Any], dict[str, np.ndarray[Any, Any]]]:
    """A ``.npy`` file's array, or a ``.npz`` file's arrays as a dict
    name -> array, read-only over store memory (see the module docstring).
    A truncated or corrupt file raises WeightsFileError (a ValueError) and
    leaves nothing in the store."""
    store = _weights.store_of(store)
    path = os.fsdecode(path)
    meta, bufs, _ = _weights.load(store, path, "numpy", _read(path), verify=verify,
                                  writable=False)
    if "npy" in meta:
        return _array(meta["npy"], bufs)
    return {k: _array(e, bufs) for k, e in meta["npz"].items()}


def forget(path: Optional[StrPath], store: Store) -> int:
    """Delete what ``store`` holds of files loaded from ``path`` (None:
    of every file); see dedupshm.torch.forget."""
    return _weights.forget(store, path)
