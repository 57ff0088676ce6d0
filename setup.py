"""Build of tpmoe's native extension `tpmoe._C`.

The C++ (CPU) sources in csrc/ are always built; the CUDA sources only where torch is a
CUDA build and nvcc exists. Architectures come from TORCH_CUDA_ARCH_LIST (default
"8.0;9.0"): the build never queries a device. TPMOE_SKIP_NATIVE=1 builds no extension,
and tpmoe still works: its plain-PyTorch twins run, after one warning that says how to build it.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    if os.environ.get("TPMOE_SKIP_NATIVE", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # torch 2.13 builds its own extensions as C++20; its headers warn under C++17.
    cxx_flags = ["-O3", "-std=c++20"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp its `omp parallel` is
        # compiled out and every CPU op of the extension runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        # Without an explicit list torch would ask the local GPU; a build must not need one.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extension = CUDAExtension(
            "tpmoe._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("TPMOE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "tpmoe._C",
            cpp_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
