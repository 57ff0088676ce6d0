"""The one place that knows about the Triton interpreter (TRITON_INTERPRET=1).

The interpreter multiplies the raw bit patterns of bf16 operands in `tl.dot`
(triton-lang/triton#11584), so under the interpreter every dot operand of a half-precision
dtype is upcast to fp32 first. On a GPU the operands stay in their dtype (the tensor cores
take bf16/fp16 and accumulate in fp32), so the compiled kernels never carry the upcast: the
flag is a constexpr the launchers set from `interpreter_active()`.
"""
import torch
import triton
import triton.language as tl
from triton import knobs


def interpreter_active() -> bool:
    """True when TRITON_INTERPRET=1 was set (kernels decorated now run on CPU tensors)."""
    return bool(knobs.runtime.interpret)


def kernel_is_interpreted(kernel) -> bool:
    # triton.jit reads TRITON_INTERPRET when it decorates: a kernel decorated before the
    # variable was set stays a compiled JITFunction and cannot take CPU tensors.
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def require_runnable(kernel, device: torch.device) -> None:
    """Raises a RuntimeError that says what to do when `kernel` cannot run on `device`."""
    if device.type == "cuda":
        if kernel_is_interpreted(kernel):
            raise RuntimeError("tpmoe.triton: got CUDA tensors, but TRITON_INTERPRET=1 was set when tpmoe.triton "
                               "was imported, so its kernels only run on CPU tensors; unset it and restart")
        return
    if device.type != "cpu":
        raise RuntimeError(f"tpmoe.triton: expected CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                           f"got tensors on {device}")
    if not kernel_is_interpreted(kernel):
        raise RuntimeError("tpmoe.triton: got CPU tensors, which the Triton kernels only take under the "
                           "interpreter: set TRITON_INTERPRET=1 in the environment before tpmoe.triton is "
                           "first imported (or use backend='cpu')")


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr kernel arguments fixing how `tl.dot` and the stores run for inputs of `dtype`.

    INTERPRETED: under the interpreter, upcast half-precision dot operands and round bf16
    results to nearest by hand (see `as_dot_operand`, `round_to`); False for compiled kernels.
    DOT_PRECISION: fp32 inputs use TF32 only where torch would (allow_tf32), so a float32
    call is as exact as torch's float32 matmul by default.
    ACC_FP64: float64 inputs accumulate in float64 (the interpreter and tests use them).
    """
    half = dtype in (torch.float16, torch.bfloat16)
    # (For half-precision operands the precision argument has no effect; "tf32" is the default.)
    tf32 = half or (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    return dict(INTERPRETED=interpreter_active(), DOT_PRECISION="tf32" if tf32 else "ieee",
                ACC_FP64=dtype == torch.float64)


@triton.jit
def as_dot_operand(tile, INTERPRETED: tl.constexpr):
    """A tile ready for `tl.dot`: half precision upcast to fp32 under the interpreter, untouched
    when compiled (triton-lang/triton#11584: the interpreter multiplies bf16 bit patterns)."""
    if INTERPRETED:
        if tile.dtype == tl.bfloat16 or tile.dtype == tl.float16:
            tile = tile.to(tl.float32)
    return tile


@triton.jit
def zeros_accumulator(BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ACC_FP64: tl.constexpr):
    """The fp32 accumulator of every GEMM here (fp64 when the inputs are float64). Every tl.dot
    into it passes out_dtype=acc.dtype: triton 3.6 asserts that the accumulator's dtype is
    out_dtype, whose default is float32 there (later releases default to the accumulator's)."""
    if ACC_FP64:
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    return acc


@triton.jit
def round_to(value, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """value.to(dtype), rounding to nearest even as a GPU does.

    Compiled, fp32 -> bf16 is one cvt.rn instruction. The interpreter truncates instead (its
    cast ignores the rounding mode), which doubles the bf16 error, so under the interpreter
    the rounding is done on the fp32 bit pattern first (the truncation is then exact).
    """
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            value = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return value.to(dtype)
