"""cffi build script (API mode, out of line) for dedupshm._core.

The declarations come from the marked region of dedupshm.h, so the C ABI
is written once.  Constants are filled in by the compiler.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["hash.c", "heap.c", "pool.c", "store.c", "object.c", "put.c", "merger.c", "wp.c",
           "check.c", "refs.c"]


def _cdef():
    with open(os.path.join(HERE, "dedupshm.h")) as f:
        text = f.read()
    region = text.split("cffi:begin")[1].split("cffi:end")[0]
    region = region.split("\n", 1)[1].rsplit("\n", 1)[0]
    region = re.sub(r"/\*.*?\*/", "", region, flags=re.S)
    # let the compiler fill in every constant
    region = re.sub(r"^#define (\w+) .*$", r"#define \1 ...", region, flags=re.M)
    return region


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "dedupshm._core",
    '#include "dedupshm.h"',
    sources=[os.path.relpath(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
