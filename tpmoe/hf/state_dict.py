"""`tpmoe.hf.gather_state_dict`: the full HF-format state dict of a model swapped by apply."""
from typing import Dict

import torch
from torch import nn

from .shards import is_dtensor


def gather_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict in HF names with full tensors, identical on every rank.

    Each tpmoe block contributes its weights under the names the replaced HF block used (one
    all-gather per block under TP); DTensors that transformers' TP left elsewhere are gathered
    with full_tensor(). Every rank must call it (collectives), in the same order.
    `model.save_pretrained(path, state_dict=gather_state_dict(model))` then writes a checkpoint
    that the original class loads bit for bit.
    """
    from .module import TpmoeHFBlock

    ours = {name: module for name, module in model.named_modules() if isinstance(module, TpmoeHFBlock)}
    full_by_block = {name: module.block.gather_full() for name, module in ours.items()}
    state_dict, emitted = {}, set()
    for key, value in model.state_dict().items():
        owner = next((name for name in ours if key.startswith(name + ".")), None)
        if owner is not None:
            if owner not in emitted:
                emitted.add(owner)
                state_dict.update(_hf_entries(owner, ours[owner], full_by_block[owner]))
            continue
        if is_dtensor(value):
            value = value.full_tensor()
        state_dict[key] = value.detach()
    return state_dict


def _hf_entries(prefix: str, module, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    entries = {}
    for tp_name, hf_names in module.hf_weight_names.items():
        parts = torch.split(full[tp_name], module.hf_weight_rows[tp_name], dim=0) if len(hf_names) > 1 \
            else [full[tp_name]]
        for hf_name, part in zip(hf_names, parts):
            entries[f"{prefix}.{hf_name}"] = part.contiguous()
    return entries
