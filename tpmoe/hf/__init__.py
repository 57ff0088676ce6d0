"""tpmoe inside Hugging Face transformers models: one explicit call, nothing patched at import.

    report = tpmoe.hf.apply(model)                 # one process
    report = tpmoe.hf.apply(model, group)          # tensor parallel: ProcessGroup or DeviceMesh
    report = tpmoe.hf.apply(model, mesh)           # expert parallel: a mesh with an "ep" (and "tp") dim
    state_dict = tpmoe.hf.gather_state_dict(model) # HF names, full tensors, on every rank
    model.save_pretrained(path, state_dict=state_dict)   # loads into the original class
    tpmoe.hf.register_experts_implementation()     # then experts_implementation="tpmoe"
    tpmoe.hf.apply(model, quantized_experts=tensors)  # a checkpoint's MXFP4 / fp8 experts, read as stored

`apply` judges every MoE block of the model from its code (tpmoe/hf/judge.py, against the
verified pieces of tpmoe/hf/registry.py) and either swaps the whole block for a `TpmoeHFBlock`
(routed experts + shared expert in one tpmoe.MoEBlock, router native or the family's own) or,
for blocks of any other structure, only its experts module for a `TpmoeHFExperts`
(tpmoe/hf/module.py). Either way the block costs one all-reduce forward and one backward under
TP. The replacement holds the block's own weights: the full ones in one process; with a group,
this rank's slice (tpmoe.sharding). A model loaded with transformers' own tensor parallelism
(`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`) may hold any mix
of DTensor shards, Replicate DTensors and plain whole tensors: each weight is taken as its local
shard where transformers' slicing is tpmoe's (a one-tensor weight without a copy: the local
shard becomes the block's parameter's local tensor), made whole and re-cut otherwise
(tpmoe/hf/shards.py), and blocks the plan left whole are
sharded over the model's TP mesh too. Nothing is re-read from disk; attention, embeddings and
dense MLPs stay exactly as transformers sharded them.

Quantized experts run at their own size (tpmoe/hf/quantized.py): transformers' fine-grained FP8
experts (FP8Experts) are read as they are by `apply`; a checkpoint's MXFP4 (GPT-OSS) or FP8
experts are taken by `apply(model, quantized_experts=tensors)` (or `load_quantized_experts`
after apply). Either way each rank
keeps its slice at any TP size, and the quantized weights are frozen.

Which families run, how, and why others are refused: `python -m tpmoe.hf.families` and its
snapshot tpmoe/hf/families_snapshot.json.
"""
from .experts_interface import EXPERTS_IMPLEMENTATION, register_experts_implementation, tpmoe_experts_forward
from .judge import UnsupportedFamilyError
from .quantized import load_quantized_experts
from .state_dict import gather_state_dict
from .swap import ApplyReport, ReplacedBlock, apply, data_parallel_parameters

__all__ = ["ApplyReport", "ReplacedBlock", "UnsupportedFamilyError", "apply", "data_parallel_parameters",
           "gather_state_dict", "load_quantized_experts",
           "register_experts_implementation", "tpmoe_experts_forward", "EXPERTS_IMPLEMENTATION"]
