"""What a piece of the GPU path would launch and whether it would read the device from the host,
measured on CPU from the ops it issues (shared by test_launch_count.py and test_triton_align.py).

`LaunchCounter` records, in order:
- every Triton kernel launch (`JITFunction.run`, or `InterpretedFunction.run` under
  TRITON_INTERPRET=1), as "triton:<kernel name>";
- every ATen op that would launch a CUDA kernel on CUDA tensors, seen by a TorchDispatchMode: all
  ops but those that only allocate, alias or describe (NOT_KERNELS); fills, copies, casts and
  reductions count;
- every C++ op of tpmoe._C (`tpmoe::route`, `tpmoe::align`) as one launch, "native:<name>":
  its CUDA implementation is one kernel (route) and its insides are not visible from Python.
The ATen ops inside a tpmoe Triton custom op (`tpmoe::triton_*`) are seen too (the op is
re-dispatched with the mode active), while what the interpreter itself does to run a kernel on
CPU (copies in and out of its buffers) is not: on a GPU a launch is that launch only.

`HostSyncGuard` fails on every host read of tensor data (`HostSyncCounter` lists them instead): the ops that copy a value to the host
(`aten._local_scalar_dense`, behind .item(), int(), float(), bool()), the ops whose output shape
depends on the data (torch's `dynamic_output_shape` / `data_dependent_output` tags: nonzero,
masked_select, unique, boolean indexing, ...), and `Tensor.tolist` / `Tensor.numpy`, which read
memory without dispatching. A Triton launch under the interpreter is exempt (it runs on the
host by construction; compiled, it is a launch).
"""
import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
import triton.runtime.jit

# ATen ops that launch no CUDA kernel: allocation, views and aliasing, metadata.
NOT_KERNELS = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "as_strided", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select", "slice", "alias",
    "detach", "split", "split_with_sizes", "unbind", "chunk", "narrow", "view_as", "flatten", "unflatten",
    "_reshape_alias", "lift_fresh", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
    "is_contiguous", "size", "stride", "numel",
}

_state = threading.local()


def _inside_launch() -> bool:
    return getattr(_state, "launch_depth", 0) > 0


@contextlib.contextmanager
def _launch_scope():
    _state.launch_depth = getattr(_state, "launch_depth", 0) + 1
    try:
        yield
    finally:
        _state.launch_depth -= 1


def _launch_classes():
    classes = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def _hooked_launches(on_launch):
    """Wraps the `run` of every Triton kernel class: on_launch(name) once per launch, and what the
    launch does inside is marked as such (_inside_launch)."""
    saved = []
    for cls in _launch_classes():
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                on_launch(getattr(self, "__name__", None) or self.fn.__name__)
            with _launch_scope():
                return _original(self, *args, **kwargs)

        saved.append((cls, original))
        cls.run = run
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


def _is_tpmoe_triton_op(func) -> bool:
    return func.namespace == "tpmoe" and func._schema.name.split("::")[-1].startswith("triton_")


def _redispatch_below(mode, func, args, kwargs):
    """Runs a tpmoe Triton custom op's implementation with `mode` active, so the ATen ops it issues
    are seen (calling func inside __torch_dispatch__ would run it with the mode switched off)."""
    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    key = torch._C.DispatchKey.CUDA if "cuda" in devices else torch._C.DispatchKey.CPU
    with mode:
        return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)


class _CountingMode(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _inside_launch():
            return func(*args, **kwargs)
        if func.namespace == "tpmoe":
            if _is_tpmoe_triton_op(func):
                return _redispatch_below(self, func, args, kwargs)
            self.record(f"native:{func._schema.name.split('::')[-1]}")
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name not in NOT_KERNELS:
            self.record(f"aten:{name}")
        return func(*args, **kwargs)


class LaunchCounter:
    """with LaunchCounter() as counter: ...; counter.launches is the ordered list of launches."""

    def __init__(self):
        self.launches = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self._stack.enter_context(_hooked_launches(lambda name: self.launches.append(f"triton:{name}")))
        self._stack.enter_context(_CountingMode(self.launches.append))
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def breakdown(self) -> str:
        return "\n".join(f"  {i + 1:2}. {name}" for i, name in enumerate(self.launches))


class HostSyncError(AssertionError):
    pass


_DATA_DEPENDENT_TAGS = tuple(getattr(torch.Tag, tag) for tag in ("dynamic_output_shape", "data_dependent_output")
                             if hasattr(torch.Tag, tag))
_HOST_READS = {"_local_scalar_dense", "item", "equal", "is_nonzero"}


def _integer_indexing(name: str, args) -> bool:
    """x[index] with integer index tensors: tagged dynamic_output_shape for the boolean-mask case
    only (the mask's count of True sets the shape); with integer indices the shape is theirs."""
    if name != "index" or len(args) < 2:
        return False
    indices = [index for index in args[1] if index is not None]
    return all(not index.dtype.is_floating_point and index.dtype not in (torch.bool, torch.uint8)
               for index in indices)


class _SyncMode(TorchDispatchMode):
    def __init__(self, on_read):
        super().__init__()
        self.on_read = on_read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _inside_launch():
            name = func._schema.name.split("::")[-1]
            if name in _HOST_READS or (any(tag in func.tags for tag in _DATA_DEPENDENT_TAGS)
                                       and not _integer_indexing(name, args)):
                self.on_read(f"{func} reads tensor data on the host (a device sync on CUDA)")
            if _is_tpmoe_triton_op(func):
                return _redispatch_below(self, func, args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _watching_host_reads(on_read):
    """on_read(description) at every host read of tensor data inside (see the module docstring)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def watched(name):
        def read(self, *args, **kwargs):
            if not _inside_launch():
                on_read(f"Tensor.{name} reads tensor data on the host (a device sync on CUDA)")
            return saved[name](self, *args, **kwargs)
        return read

    with _hooked_launches(lambda name: None):
        for name in saved:
            setattr(torch.Tensor, name, watched(name))
        try:
            with _SyncMode(on_read):
                yield
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def HostSyncGuard():
    """Raises HostSyncError at the first host read of tensor data in the block (see the module docstring)."""
    def refuse(description):
        raise HostSyncError(description)

    with _watching_host_reads(refuse):
        yield


class HostSyncCounter:
    """with HostSyncCounter() as counter: ...; counter.reads lists every host read of tensor data
    inside, in order (what HostSyncGuard refuses), for code allowed a known number of them."""

    def __init__(self):
        self.reads = []
        self._context = None

    def __enter__(self):
        self._context = _watching_host_reads(self.reads.append)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def run_as_on_a_gpu(monkeypatch):
    """Makes CPU tensors take the path CUDA tensors take, for counting on CPU what a GPU runs:
    align runs the Triton kernels (tpmoe.routing.uses_triton_align), and the id checks that read
    the ids on the host for CPU tensors only (skipped for CUDA tensors, where the align kernel
    asserts instead) are switched off."""
    import tpmoe.fused
    import tpmoe.routing

    monkeypatch.setattr(tpmoe.routing, "uses_triton_align", lambda device: True)
    monkeypatch.setattr(tpmoe.routing, "_check_ids_on_host", lambda topk_ids, num_experts: None)
    monkeypatch.setattr(tpmoe.fused, "check_ids_in_range", lambda topk_ids, num_experts, name="topk_ids": None)
