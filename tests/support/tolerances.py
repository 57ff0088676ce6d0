"""Tolerances derived from the dtype, never picked to make a test pass.

fp32 paths are compared at 1e-5 relative (to the largest magnitude of the reference). For
fp16/bf16 the bound is twice the error that a plain same-dtype PyTorch run makes against the
float64 reference (the flash-attention habit), so the bound tracks the rounding the dtype
really causes on these very inputs.
"""
import torch

FP32_RTOL = 1e-5


def max_rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    scale = reference.abs().max().clamp_min(1e-30)
    return ((actual.double() - reference).abs().max() / scale).item()


def assert_fp32_close(actual, reference, name="output", rtol=FP32_RTOL):
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error = max_rel_error(actual, reference)
    assert error <= rtol, f"{name}: max relative error {error:.3e} > {rtol:.1e}"


def assert_within_twice_same_dtype(actual, same_dtype_torch, reference64, name="output", floor=None):
    """err(actual) <= 2 * err(same-dtype torch), both against the float64 reference.

    `floor` guards the case where the same-dtype run happens to be exact (err == 0): then the
    bound is the dtype's unit roundoff at the reference's scale, stated by the caller.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    ours = max_rel_error(actual, reference64)
    theirs = max_rel_error(same_dtype_torch, reference64)
    bound = 2 * theirs
    if floor is not None:
        bound = max(bound, floor)
    assert ours <= bound, f"{name}: error {ours:.3e} > 2 x same-dtype torch error {theirs:.3e}"

# float64 paths differ from the float64 reference by summation order only (errors near 1e-15
# relative at these sizes); 1e-12 leaves three orders of margin and still catches any real error.
FP64_RTOL = 1e-12
