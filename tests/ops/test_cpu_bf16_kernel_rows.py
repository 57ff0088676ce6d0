"""The bound on an expert's rows for tpmoe's AVX512-BF16 kernel (csrc/experts_cpu_gemm.cpp) on
the native CPU path, tpmoe.cpu.bf16_kernel_max_rows(): past it ATen's GEMM (oneDNN) runs. By
default 4 where oneDNN has AMX-BF16 (its GEMM outruns the kernel past a few rows there), none
elsewhere; TPMOE_CPU_BF16_KERNEL_MAX_ROWS forces it. (Both GEMMs, each on its own and as the
default splits the experts, are checked against PyTorch in test_cpu_kernels.py and
test_cpu_uninitialized.py; their float32 sums round to the same bf16 almost always, so the
outputs cannot show which one ran.)"""
import os

import pytest

from tpmoe._native import native_available
from tpmoe.cpu import bf16_kernel_max_rows

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

ENV = "TPMOE_CPU_BF16_KERNEL_MAX_ROWS"
NO_BOUND = 2**63 - 1


def cpu_flags() -> set:
    """/proc/cpuinfo's flags: what the CPU reports, read apart from torch's cpuinfo."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next(line for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    return set(line.split(":", 1)[1].split())


def test_default_bound_follows_amx_and_the_variable_forces_it(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    amx = "amx_bf16" in cpu_flags() and (onednn_isa == "ALL" or "AMX" in onednn_isa)
    assert bf16_kernel_max_rows() == (4 if amx else NO_BOUND)
    for forced in ("0", "5", str(2**62)):
        monkeypatch.setenv(ENV, forced)
        assert bf16_kernel_max_rows() == int(forced)
