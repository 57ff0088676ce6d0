"""The CUDA build of the routing ops compiles, with the flags a torch build uses.

Nothing runs: this machine has no GPU. The check catches what only a CUDA build would see,
on machines where setup.py leaves the CUDA sources out because torch is a CPU build:
- csrc/*.cu (the kernels and their launchers) with nvcc for sm_80 and sm_90, the
  architectures setup.py builds by default;
- the CUDA op glue (csrc/*_cuda_op.cpp: checks, outputs, stream, registration) with the host
  compiler and TPMOE_WITH_CUDA defined, as CUDAExtension compiles it. It includes only
  c10/cuda headers (csrc/cuda_compat.h), which a CPU torch also ships.
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, CUDA_HOME, include_paths

from support import ROOT  # noqa: E402
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
CUDA_GLUE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*_cuda_op.cpp")))


def _find_nvcc():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()


def _cuda_include():
    """The toolkit's include folder (cuda_runtime.h), which the host compiler needs too."""
    candidates = [CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    pytest.skip("the CUDA toolkit's include folder (cuda_runtime.h) was not found next to nvcc")


def _includes():
    paths = include_paths() + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc"), _cuda_include()]
    return [f"-I{path}" for path in paths]


def _defines():
    # As setup.py and torch's BuildExtension pass them for a CUDAExtension.
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-DTPMOE_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def nvcc_command(source, output):
    architectures = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    return ([NVCC, "-c", source, "-o", output, "-std=c++20", "-Xcompiler", "-fPIC", "-Xptxas", "-v"]
            + architectures + _includes() + _defines() + COMMON_NVCC_FLAGS)


def host_command(source):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    return [compiler, "-fsyntax-only", "-std=c++20", "-fPIC", source] + _includes() + _defines()


def _own_warnings(stderr):
    """Lines warning about our sources (the torch headers warn under C++17; that is theirs)."""
    return [line for line in stderr.splitlines() if "csrc/" in line and "warning" in line]


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no csrc/*.cu sources")
def test_cuda_build_compiles(tmp_path):
    def compile_one(source):
        if source.endswith(".cu"):
            output = str(tmp_path / (os.path.basename(source) + ".o"))
            done = subprocess.run(nvcc_command(source, output), capture_output=True, text=True, timeout=300)
        else:
            done = subprocess.run(host_command(source), capture_output=True, text=True, timeout=300)
        return source, done

    # The files are independent: compile them side by side.
    sources = CUDA_SOURCES + CUDA_GLUE_SOURCES
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(compile_one, sources))
    for source, done in results:
        name = os.path.basename(source)
        assert done.returncode == 0, f"compiling {name} failed:\n{done.stderr[-6000:]}"
        assert not _own_warnings(done.stderr), "\n".join(_own_warnings(done.stderr))
        if name.endswith(".cu"):
            # ptxas -v: no kernel spills registers to local memory.
            spills = [line for line in done.stderr.splitlines()
                      if any(int(count) for count in re.findall(r"(\d+) bytes spill", line))]
            assert not spills, f"{name}:\n" + "\n".join(spills)
