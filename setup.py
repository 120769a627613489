# Only here to build the cffi extension; metadata lives in pyproject.toml.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class FreshBuildPy(build_py):
    """Copy the package into an empty build/lib/tunproxy: setuptools only adds to what an
    earlier build left there, so a module since deleted from the tree would ship again."""

    def run(self):
        shutil.rmtree(Path(self.build_lib) / "tunproxy", ignore_errors=True)
        super().run()


setup(cffi_modules=["fastpath_build.py:ffibuilder"], cmdclass={"build_py": FreshBuildPy})
