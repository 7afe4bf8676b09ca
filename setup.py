"""setuptools entry point. Metadata lives in pyproject.toml; this file only builds interlace._C
by configuring and building CMakeLists.txt. INTERLACE_CUDA=AUTO|ON|OFF (environment) chooses the
CUDA part; AUTO builds it whenever a CUDA compiler is found."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DINTERLACE_CUDA={os.environ.get('INTERLACE_CUDA', 'AUTO')}",
            "-DCMAKE_BUILD_TYPE=Release", *(["-G", "Ninja"] if shutil.which("ninja") else []),
        ]  # fmt: skip
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


setup(ext_modules=[Extension("interlace._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
