# Only here to build the cffi extension; metadata lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["fastpath_build.py:ffibuilder"])
