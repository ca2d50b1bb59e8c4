# cffi has no pyproject.toml key for cffi_modules; this shim is the accepted way.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
