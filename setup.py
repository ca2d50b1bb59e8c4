# cffi has no pyproject.toml key for cffi_modules; this shim is the accepted way.
# The extension uses only the stable ABI (cffi builds it with Py_LIMITED_API),
# so one wheel, tagged cp310-abi3, serves every CPython >= 3.10.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp310"}})
