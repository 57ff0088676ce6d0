"""transformers' own MoE block of a preset's family, holding the SAME weight tensors as tpmoe's
block (no copies), for `tpmoe bench` to time its experts implementations ("eager",
"grouped_mm") on exactly the work tpmoe does.

The block is built on the meta device (no memory) from the family's config class
(tpmoe/hf/configs.py, registry CONFIGS) and each of its tensors is then replaced by a tensor of
tpmoe's weight dict or a view of one (the shared expert's gate and up projections are the two
halves of tpmoe's concatenated shared_gate_up), through the adapter's own weight map.
transformers is imported inside the functions: this module imports without it.
"""
from typing import Callable, Dict, Tuple

import torch

from ..config import MoEConfig


class HFUnavailable(RuntimeError):
    """transformers is missing, or cannot express this block: the reason, for the bench's notes."""


def untested_transformers():
    """None, or the one line saying the installed transformers is outside tpmoe.hf's tested range
    (None too where it is missing: make_hf_block then says so)."""
    try:
        import transformers
    except ImportError:
        return None
    from ..hf.version import untested_message
    return untested_message(transformers.__version__)


def _set_tensor(module: torch.nn.Module, dotted_name: str, value: torch.Tensor, trainable: bool) -> None:
    owner_name, _, name = dotted_name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=trainable)
    else:  # a buffer (DeepSeek-V3's correction bias): the same values tpmoe's block routes with
        owner._buffers[name] = value.detach()


def meta_hf_block(family: str, config: MoEConfig, implementation: str):
    """tpmoe.hf.configs.meta_block (the family's block on the meta device, its weight map), its
    failures as HFUnavailable."""
    from ..hf.configs import Inexpressible, meta_block
    from ..hf.judge import UnsupportedFamilyError

    try:
        return meta_block(family, config, implementation)
    except ImportError as error:
        raise HFUnavailable(f"transformers is not installed ({error}); pip install 'tpmoe[hf]'") from None
    except (Inexpressible, UnsupportedFamilyError) as error:  # the latter: this release's block is not tpmoe's
        raise HFUnavailable(str(error)) from None


def make_hf_block(family: str, config: MoEConfig, weights: Dict[str, torch.Tensor], implementation: str,
                  trainable: bool) -> Tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(the HF block sharing `weights`, a call [T, H] -> [T, H]). Raises HFUnavailable."""
    module, hf_weights = meta_hf_block(family, config, implementation)
    for name in hf_weights.names:
        for hf_name, part in hf_weights.to_hf(name, weights[name]).items():
            _set_tensor(module, hf_name, part, trainable)
    left_on_meta = [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
                    if tensor.is_meta]
    if left_on_meta:
        raise HFUnavailable(f"transformers' {type(module).__name__} has tensors tpmoe does not map: {left_on_meta}")
    if implementation not in ("eager",):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        if implementation not in ALL_EXPERTS_FUNCTIONS:
            raise HFUnavailable(f"this transformers has no experts implementation {implementation!r}")

    def call(hidden_states: torch.Tensor) -> torch.Tensor:
        out = module(hidden_states[None])
        out = out[0] if isinstance(out, tuple) else out  # GptOssMLP returns (output, router scores)
        return out.reshape(hidden_states.shape)

    return module, call
