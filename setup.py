"""setuptools entry point. Metadata lives in pyproject.toml; this file only builds interlace._C
by configuring and building CMakeLists.txt. INTERLACE_CUDA=AUTO|ON|OFF (environment) chooses the
CUDA part; AUTO builds it whenever a CUDA compiler is found. INTERLACE_PYTHON_INCLUDE names a
folder holding this Python's headers (Python.h) where the interpreter has none installed."""

import os
import shutil
import subprocess
import sys
import sysconfig
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
            "-DCMAKE_BUILD_TYPE=Release", *(["-G", "Ninja"] if shutil.which("ninja") else []), *python_headers(),
        ]  # fmt: skip
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


def python_headers() -> list[str]:
    """CMake's hint to the Python headers: INTERLACE_PYTHON_INCLUDE when set; none when the
    interpreter's own are there; else a clear error, before CMake's longer one."""
    given = os.environ.get("INTERLACE_PYTHON_INCLUDE")
    own = Path(sysconfig.get_paths()["include"])
    if given:
        if not (Path(given) / "Python.h").is_file():
            raise SystemExit(f"INTERLACE_PYTHON_INCLUDE={given} holds no Python.h")
        return [f"-DPython_INCLUDE_DIR={given}"]
    if (own / "Python.h").is_file():
        return []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    raise SystemExit(f"building interlace._C needs Python {version}'s headers, and {own} has no Python.h: install them "
                     f"(python{version}-dev, or the distribution's equivalent), or set INTERLACE_PYTHON_INCLUDE to a "
                     f"folder holding Python {version}'s Python.h and pyconfig.h")  # fmt: skip


setup(ext_modules=[Extension("interlace._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
