"""`tpmoe.hf.gather_state_dict`: the full HF-format state dict of a model swapped by apply."""
from typing import Dict

import torch
from torch import nn

from .shards import is_dtensor


def gather_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict in HF names with full tensors, identical on every rank.

    Each tpmoe replacement (a whole block, or a block's experts module) contributes its tpmoe
    weights under the names the replaced HF module used (one all-gather per block under TP); the
    HF modules a replacement keeps (a family's router, a norm) and everything else keep their
    keys; DTensors that transformers' TP left elsewhere are gathered with full_tensor(). Every
    rank must call it (collectives), in the same order.
    `model.save_pretrained(path, state_dict=gather_state_dict(model))` then writes a checkpoint
    that the original class loads bit for bit.
    """
    from .module import TpmoeHFBlock, TpmoeHFExperts

    ours = {name: module for name, module in model.named_modules()
            if isinstance(module, (TpmoeHFBlock, TpmoeHFExperts))}
    state_dict, emitted = {}, set()
    for key, value in model.state_dict().items():
        owner = next((name for name in ours if key.startswith(name + ".block.")), None)
        if owner is not None:
            if owner not in emitted:
                emitted.add(owner)
                state_dict.update({f"{owner}.{hf_name}": tensor for hf_name, tensor in ours[owner].hf_state().items()})
            continue
        if is_dtensor(value):
            value = value.full_tensor()
        state_dict[key] = value.detach()
    return state_dict
