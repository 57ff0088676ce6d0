"""Argument checks shared by the public entry points: each error names the argument, what was
expected and what came."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how the messages name a dtype."""
    return str(dtype).replace("torch.", "")


def check_tensor(value, name: str, *, ndim=None, dtypes=None, device=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({expected}), got {dtype_name(value.dtype)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like hidden_states), got one on {value.device}")
    return value


def check_shape(value: torch.Tensor, name: str, expected: tuple, meaning: str = ""):
    if tuple(value.shape) != tuple(expected):
        hint = f" ({meaning})" if meaning else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{hint}, got {tuple(value.shape)}")


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int, name: str = "topk_ids"):
    """Reads the ids' extremes: an out-of-range id would otherwise read another expert's memory
    or past the weights, silently. Not on CUDA: there reading them would sync the device in
    every MoE layer (and break CUDA-graph capture), and the align kernel that every GPU path
    runs first stops on a bad id with a device-side assert instead of indexing with it."""
    if topk_ids.numel() == 0 or topk_ids.is_cuda or torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(topk_ids)
    low, high = int(low), int(high)
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: expected expert ids in [0, {num_experts}), got {bad}")
