"""transformers' own block of a family in registry.CONFIGS, at the sizes of a tpmoe.MoEConfig.

    kwargs = hf_config_kwargs("qwen3_moe", config)        # the config class's arguments for config
    block, weights = meta_block("qwen3_moe", config)      # its BLOCKS class on the meta device
    plan, weights, config = describe(block)               # what tpmoe.hf.apply reads off a block

`describe` is the adapter's own reading (judge.plan_for, weight_map), so a block built here is
read as in a model; `hf_config_kwargs` is its inverse, and `meta_block` checks that the block
built describes the config asked for (what a family fixes, such as Mixtral's renormalisation,
cannot be asked otherwise). transformers is imported inside the functions.
"""
import dataclasses
from typing import Dict, Tuple

import torch
from torch import nn

from ..config import MoEConfig
from . import registry as R
from .code import configuration_module, reference_class
from .judge import Plan, plan_for
from .weight_map import WeightMap, moe_config_of, weight_map

FAMILIES: Tuple[str, ...] = tuple(entry.family for entry in R.CONFIGS)


class Inexpressible(ValueError):
    """A tpmoe.MoEConfig that the family's transformers config class cannot describe."""


def config_impl(family: str) -> R.ConfigImpl:
    for entry in R.CONFIGS:
        if entry.family == family:
            return entry
    raise Inexpressible(f"family: expected one of {', '.join(FAMILIES)} (tpmoe/hf/registry.py CONFIGS), "
                        f"got {family!r}")


def config_class(family: str) -> type:
    """The family's transformers config class (ImportError where this transformers lacks it)."""
    return getattr(configuration_module(family), config_impl(family).class_name)


def block_class(family: str) -> type:
    """The family's block class: its BLOCKS entry."""
    config_impl(family)
    (block,) = [block for block in R.BLOCKS if block.family == family]
    return reference_class(family, block.class_name)


def hf_config_kwargs(family: str, config: MoEConfig) -> Dict[str, object]:
    """The family's config-class arguments describing `config` (fields it fixes are not written)."""
    entry = config_impl(family)
    kwargs = {field: getattr(config, ours) for field, ours in entry.fields.items()}
    if entry.activation is not None:
        if config.activation not in R.ACT2FN_NAMES:
            raise Inexpressible(f"activation {config.activation!r} has no transformers name")
        kwargs[entry.activation] = R.ACT2FN_NAMES[config.activation]
    if entry.shared_experts is not None:
        if config.shared_intermediate_size % config.intermediate_size:
            raise Inexpressible(f"{family}'s shared experts are whole experts: shared size "
                                f"{config.shared_intermediate_size} is not a multiple of {config.intermediate_size}")
        kwargs[entry.shared_experts] = config.shared_intermediate_size // config.intermediate_size
    return kwargs


def describe(block: nn.Module) -> Tuple[Plan, WeightMap, MoEConfig]:
    """(the judged plan, the weight map, the MoEConfig) of an HF block, as tpmoe.hf.apply reads them."""
    plan = plan_for(block)
    weights = weight_map(plan, plan.replaced(block))
    return plan, weights, moe_config_of(block, plan, weights)


def moe_config_from_hf(family: str, hf_config) -> MoEConfig:
    """The MoEConfig of the family's block built from `hf_config` (on the meta device: any size)."""
    with torch.device("meta"):
        block = block_class(family)(hf_config)
    return describe(block)[2]


def meta_block(family: str, config: MoEConfig, experts_implementation: str = "eager") -> Tuple[nn.Module, WeightMap]:
    """(the family's block describing `config`, on the meta device, its tensors for the caller to
    set; its weight map). Raises Inexpressible where the family's block computes another one."""
    hf_config = config_class(family)(**hf_config_kwargs(family, config))
    hf_config._experts_implementation = experts_implementation
    with torch.device("meta"):
        block = block_class(family)(hf_config)
    _, weights, described = describe(block)
    differences = [f"{field.name}={getattr(described, field.name)!r}, not {getattr(config, field.name)!r}"
                   for field in dataclasses.fields(MoEConfig)
                   if getattr(described, field.name) != getattr(config, field.name)]
    if differences:
        raise Inexpressible(f"transformers' {type(block).__name__} computes another block: {'; '.join(differences)}")
    return block, weights
