"""What machine a figure comes from, for the bench's header and plot: the CPU's name with the
instruction sets the CPU kernels use, and how loaded the machine is (a figure taken under load is
not one to compare against a quiet run)."""
import os
import torch

# The flags that change which CPU kernels run (bf16 dot products, AMX tiles) and so the figures.
NOTABLE_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """'Intel(R) Xeon(R) Processor (avx512_bf16, amx_bf16), 2 cores' from /proc/cpuinfo where
    there is one, else platform.processor()."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        import platform
        name = platform.processor() or platform.machine()
    notable = ", ".join(flag for flag in NOTABLE_FLAGS if flag in flags)
    return f"{name or 'unknown CPU'}" + (f" ({notable})" if notable else "") + f", {os.cpu_count()} cores"


def load_text() -> str:
    """'load 3.1 on 2 cores' (the 1-minute load average), '' where the OS does not say."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    return f"load {load:.1f} on {os.cpu_count()} cores"


def machine_text(device_type: str = "cpu") -> str:
    """The CUDA device's name, or the CPU's."""
    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    return cpu_name()

