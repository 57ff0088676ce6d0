"""The one way to the built extension `tpmoe._C`, and the one decision whether its ops run.

Every op of tpmoe lives in the namespace `torch.ops.tpmoe`: the C++ ops of tpmoe._C (route,
align, experts_cpu_*) and the Triton launches (triton_*, tpmoe.triton.ops). For the C++ ops:
- `native_ops()` loads tpmoe._C once and returns `torch.ops.tpmoe`, or raises
  NativeExtensionMissing with the build command;
- what torch needs around an op that only exists once tpmoe._C is loaded (its
  `torch.library.register_fake`, `register_autograd`) is a function decorated with
  `@on_load` in the op's module, run once the ops exist;
- `use_native_ops()` is the backend decision of every caller (tpmoe.routing, tpmoe.fused):
  without the extension, or with TPMOE_SKIP_NATIVE=1 in the environment (the variable that
  also makes setup.py build no extension), the callers run the plain-PyTorch twins
  (tpmoe.routing_torch, tpmoe.cpu.experts_torch), correct and slower, after one
  NativeFallbackWarning per process; `use_native_ops(device)` also answers for an accelerator
  (a build without nvcc has no CUDA kernels: CUDA tensors then route through the twin).
  torch.compile reads the decision when it traces.

`import tpmoe` never needs the extension; it loads it where it is built, so that a first
call traced by torch.compile finds the ops and their fakes in place.
"""
import importlib
import os
import sys
import warnings

SKIP_NATIVE_VAR = "TPMOE_SKIP_NATIVE"
_BUILD_HINT = (
    "the native extension tpmoe._C is not built. Build it with "
    "`pip install --no-build-isolation -e .` in the tpmoe checkout (or `make build`); "
    f"{SKIP_NATIVE_VAR}=1 skips it on purpose."
)
_ops = None          # torch.ops.tpmoe, once tpmoe._C is loaded
_load_error = None   # the ImportError of the one load attempt where it failed
_on_load = []        # the @on_load registrations, run once the ops exist
_fallback_warned = False


class NativeExtensionMissing(ImportError):
    pass


class NativeFallbackWarning(RuntimeWarning):
    """tpmoe runs the plain-PyTorch twins of the ops of tpmoe._C (not built, or TPMOE_SKIP_NATIVE=1)."""


def _skipped() -> bool:
    return os.environ.get(SKIP_NATIVE_VAR, "0") == "1"


def _load() -> None:
    """Imports tpmoe._C (once, successful or not) and then runs every @on_load registration."""
    global _ops, _load_error
    if _ops is not None or _load_error is not None:
        return
    try:
        importlib.import_module("tpmoe._C")
    except ImportError as error:
        _load_error = error
        return
    import torch

    _ops = torch.ops.tpmoe
    for register in _on_load:
        register()


def on_load(register):
    """Decorator: `register()` runs once the ops of tpmoe._C exist (now, where they already do).

    tpmoe._C names the modules that hold these registrations (`m.set_python_module`), so torch
    imports such a module when an op is traced before it was imported: tpmoe._C is then
    loaded already, and the registration runs at import."""
    _on_load.append(register)
    if _ops is not None:
        register()
    elif "tpmoe._C" in sys.modules:
        _load()
    return register


def native_ops():
    """torch.ops.tpmoe with tpmoe._C loaded; NativeExtensionMissing, with the build command,
    where it is not built or TPMOE_SKIP_NATIVE=1."""
    if _skipped():
        raise NativeExtensionMissing(f"{SKIP_NATIVE_VAR}=1 in the environment: the ops of tpmoe._C are not used")
    _load()
    if _ops is None:
        raise NativeExtensionMissing(f"{_BUILD_HINT} (import failed: {_load_error})") from _load_error
    return _ops


def native_available() -> bool:
    try:
        native_ops()
    except NativeExtensionMissing:
        return False
    return True


def _runs_on(ops, device) -> bool:
    """Whether the ops of tpmoe._C run on `device`: always on CPU (and meta, through their fakes);
    on an accelerator only where the build registered kernels for it (a CUDA build compiled with
    nvcc registers `route` for CUDA; a build without nvcc has CPU kernels only)."""
    import torch

    if device is None or device.type in ("cpu", "meta"):
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(ops.route._qualified_op_name, device.type.upper())


def use_native_ops(device=None):
    """The backend decision: `torch.ops.tpmoe` where the ops of tpmoe._C run on `device` (None: on
    CPU; the caller uses it, with no second lookup); otherwise None, after warning once per process,
    and the caller runs its plain-PyTorch twin. On CUDA only `route` is native (align is the Triton
    kernel there, tpmoe.routing), so a build without CUDA kernels routes CUDA tensors through the twin."""
    global _fallback_warned
    try:
        ops = native_ops()
    except NativeExtensionMissing as missing:
        reason = f"{missing}. Routing and the CPU experts run their plain-PyTorch versions instead"
        ops = None
    else:
        if _runs_on(ops, device):
            return ops
        reason = (f"tpmoe._C has no {device.type.upper()} kernels (built without nvcc, or from a CPU torch). "
                  f"Routing of {device.type} tensors runs its plain-PyTorch version instead; rebuild with nvcc "
                  f"and a CUDA torch (`pip install --no-build-isolation -e .`) for the native kernel")
        ops = None
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"tpmoe: {reason}: correct, and slower.", NativeFallbackWarning, stacklevel=3)
    return ops


if not _skipped():
    _load()
