"""Builds the native extension memcore._C with CMake (CMakeLists.txt); metadata is in pyproject.toml.

Environment: MEMCORE_NO_CUDA=1 skips the CUDA kernels; MEMCORE_CUDA_ARCH="80;90" picks the CUDA
architectures; MAX_JOBS caps parallel compile jobs (default: all CPUs).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(module: str, attr: str, name: str) -> str:
    """The executable shipped by the pip package `module` (the build environment's), else PATH's."""
    try:
        path = Path(getattr(__import__(module), attr)) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"memcore: {name} not found; pip install {module}")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        # set (or unset) every option each time: pip reuses build_temp, and CMake caches them
        no_cuda = os.environ.get("MEMCORE_NO_CUDA", "") not in ("", "0")
        args.append(f"-DMEMCORE_CUDA={'OFF' if no_cuda else 'ON'}")
        arch = os.environ.get("MEMCORE_CUDA_ARCH")
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}" if arch else "-UCMAKE_CUDA_ARCHITECTURES")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[Extension("memcore._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
