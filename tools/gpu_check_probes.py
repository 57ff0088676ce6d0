"""The in-process checks of tools/gpu_check.py, each run in its own subprocess (a crash or a hang
in torch's import stays there) and printing one JSON object on stdout:

  python tools/gpu_check_probes.py env   # python, torch, CUDA, triton, transformers, the GPU, the toolkit
  python tools/gpu_check_probes.py ops   # import tpmoe._C: which devices each native op has a kernel for
(--json PATH writes the object to PATH instead.)
"""
import argparse
import glob
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys

NATIVE_OPS = ("route", "align", "experts_cpu_forward", "experts_cpu_backward")
# The checkout's tpmoe (the one the tests import), not another install's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(module_name):
    """(version, None) or (None, why it does not import)."""
    try:
        return getattr(importlib.import_module(module_name), "__version__", "?"), None
    except Exception as error:  # ImportError, or a broken install raising anything at import
        return None, f"{type(error).__name__}: {error}"


def _toolkit_root(torch_cuda_home):
    """The first CUDA toolkit root holding both bin/nvcc and include/cuda_runtime.h: the build
    needs the headers too, and a bare nvcc wrapper on PATH (/usr/local/bin/nvcc) makes torch
    guess a root without them."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
                  "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and \
                os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _nvcc_version(root):
    if root is None:
        return None
    try:
        done = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"failed: {error}"
    lines = done.stdout.strip().splitlines()
    return next((line for line in lines if "release" in line), lines[-1] if lines else done.stderr.strip()[:200])


def probe_env():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    info = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
                cpu_count=os.cpu_count(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), triton_interpret=os.environ.get("TRITON_INTERPRET"))
    for name in ("triton", "transformers", "numpy", "pytest", "xdist", "pytest_timeout"):
        version, problem = _version(name)
        info[name] = version
        if problem:
            info[f"{name}_problem"] = problem
    info["torch_cuda_home"] = CUDA_HOME
    info["cuda_toolkit_root"] = _toolkit_root(CUDA_HOME)
    info["nvcc"] = _nvcc_version(info["cuda_toolkit_root"])
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    compute_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as error:  # a CUDA torch built without NCCL
            info["nccl"] = f"unavailable: {error}"
    return info


def probe_ops():
    import torch

    importlib.import_module("tpmoe._C")  # registers torch.ops.tpmoe.*
    import tpmoe  # noqa: F401  (the package imports with the extension)
    kernels = {}
    for op in NATIVE_OPS:
        name = f"tpmoe::{op}"
        kernels[op] = [key for key in ("CPU", "CUDA")
                       if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
    _, triton_problem = _version("tpmoe.triton")
    return dict(kernels=kernels, torch_cuda=torch.version.cuda, tpmoe_triton_imports=triton_problem is None,
                tpmoe_triton_problem=triton_problem)


def main(argv=None):
    probes = {"env": probe_env, "ops": probe_ops}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=list(probes))
    parser.add_argument("--json", default=None, help="write the JSON here rather than to stdout")
    args = parser.parse_args(argv)
    text = json.dumps(probes[args.probe](), indent=1)
    if args.json is None:
        print(text)
    else:
        with open(args.json, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
