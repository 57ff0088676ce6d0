"""tpmoe inside Hugging Face transformers models: one explicit call, nothing patched at import.

    report = tpmoe.hf.apply(model)                 # one process
    report = tpmoe.hf.apply(model, group)          # tensor parallel: ProcessGroup or DeviceMesh
    state_dict = tpmoe.hf.gather_state_dict(model) # HF names, full tensors, on every rank
    model.save_pretrained(path, state_dict=state_dict)   # loads into the original class
    tpmoe.hf.register_experts_implementation()     # then experts_implementation="tpmoe"

`apply` swaps every MoE block of the model for a `TpmoeHFBlock` (tpmoe/hf/module.py) holding
the block's own weights: the full ones in one process; with a group, this rank's slice
(tpmoe.sharding). A model loaded with transformers' own tensor parallelism
(`from_pretrained(..., tp_plan="auto")` or `distributed_config=DistributedConfig(tp_size=N)`)
keeps its experts as DTensors sharded over the TP mesh; `apply` then takes each rank's local
shard as it is when transformers' slicing (torch.chunk of I, gate and up chunked separately)
equals tpmoe's (shard sizes equal, e.g. I divisible by the TP size), and otherwise rebuilds the
block's weights with DTensor.full_tensor() and slices them (reported as "resharded"). Nothing is
re-read from disk; attention, embeddings and dense MLPs stay exactly as transformers sharded them.

Which families are supported, and why others are refused: tpmoe/hf/families.py.
"""
from .swap import ApplyReport, ReplacedBlock, apply
from .experts_interface import EXPERTS_IMPLEMENTATION, register_experts_implementation, tpmoe_experts_forward
from .families import PATTERNS, UnsupportedFamilyError
from .state_dict import gather_state_dict

__all__ = ["ApplyReport", "ReplacedBlock", "UnsupportedFamilyError", "apply", "gather_state_dict",
           "register_experts_implementation", "tpmoe_experts_forward", "EXPERTS_IMPLEMENTATION", "PATTERNS"]
