"""Parallelism applied to one-process MoEBlocks: ParallelStyles and `tpmoe.parallelize`.

    model = MyModel()                                   # plain modules, tpmoe.MoEBlock(config) inside
    mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "tp"))
    tpmoe.parallelize(model, mesh)                      # every MoEBlock: TP over "tp"; "dp" left alone

or, beside torch's own styles in one plan (torch.distributed.tensor.parallel.parallelize_module):

    parallelize_module(model, mesh["tp"], {"attn.q_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                                           "moe": MoETensorParallel()})

A style turns the block it is applied to into what `MoEBlock.from_full(config, weights, group, ...)`
builds (MoEBlock.parallelize_): this rank keeps its slice of the weights, and the block's forward
then costs what that mode costs (docs/design.md: TP ONE all-reduce forward and ONE backward;
sequence parallel one all-gather and one reduce-scatter each way; EP and EP x TP the all-to-alls).
As torch's styles do with `src_data_rank` (0 by default), the block's weights are first broadcast
from the first rank of each mesh dimension, so the parallel model is the one-process model of that
rank however the others were initialised (None: each rank's own weights are taken as they are,
which then must agree). Apply styles before building the optimizer: the parameters are new tensors.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from .block import MoEBlock
from .distributed.groups import EP_DIM_NAME, TP_DIM_NAME


def _the_block(module: nn.Module, style: str) -> MoEBlock:
    if not isinstance(module, MoEBlock):
        raise TypeError(f"{style}: expected to be applied to a tpmoe.MoEBlock, got {type(module).__name__} "
                        f"(tpmoe.parallelize finds the blocks inside any module)")
    module.check_one_process(style)  # before the weights' broadcast: a parallel block's slices differ by rank
    return module


def _check_mesh(device_mesh, style: str, ndim: int) -> DeviceMesh:
    if not isinstance(device_mesh, DeviceMesh):
        raise TypeError(f"{style}: expected a DeviceMesh, got {type(device_mesh).__name__}")
    if device_mesh.ndim != ndim:
        raise ValueError(f"{style}: expected a {ndim}-D DeviceMesh, got a {device_mesh.ndim}-D one "
                         f"(dimensions {device_mesh.mesh_dim_names}); slice it, e.g. mesh['tp']")
    return device_mesh


def _broadcast_weights(block: MoEBlock, groups: List[dist.ProcessGroup], src: Optional[int]) -> None:
    """The block's weights of group rank `src` along each group in turn (so, of the mesh's first
    coordinate), in place; nothing where src is None."""
    if src is None:
        return
    with torch.no_grad():
        for group in groups:
            if dist.get_world_size(group) == 1:
                continue
            # Detached, sharing the parameters' storage; quantized experts' stored bytes and
            # scales too (buffers: a one-process block's are its whole quantized experts).
            quantized = getattr(block, "quantized_experts", None)
            tensors = list(block.local_shards().values()) + (list(quantized.buffers()) if quantized else [])
            for tensor in tensors:
                buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
                dist.broadcast(buffer, group=group, group_src=src)
                if buffer.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buffer)


class MoETensorParallel(ParallelStyle):
    """Tensor parallelism of a MoEBlock over a 1-D mesh: each rank keeps its slice of every
    expert's (and the shared expert's) intermediate columns, any size (DTensor's torch.chunk
    sizes); router replicated. The parameters become DTensors on the mesh. Input and output replicated on the mesh's ranks. Forward ONE
    all-reduce, backward ONE. sequence_parallel=True: input and output hold this rank's tokens
    (forward one all-gather and one reduce-scatter, backward the same; then
    tpmoe.allreduce_router_grads once per step)."""

    def __init__(self, *, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        block = _the_block(module, name)
        group = _check_mesh(device_mesh, name, 1).get_group()
        _broadcast_weights(block, [group], self.src_data_rank)
        return block.parallelize_(group, sequence_parallel=self.sequence_parallel, mesh=(device_mesh, (TP_DIM_NAME,)))


class MoESequenceParallel(MoETensorParallel):
    """MoETensorParallel with token-sharded input and output (sequence parallelism)."""

    def __init__(self):
        super().__init__(sequence_parallel=True)


class MoEExpertParallel(ParallelStyle):
    """Expert parallelism of a MoEBlock over a 1-D mesh: each rank owns whole experts (contiguous
    ranges of torch.chunk's sizes; E need not divide by the mesh size) and routes its own tokens
    (any count per rank). Forward: one all-to-all of the counts, one of the rows and one back;
    backward the two row all-to-alls; tpmoe.allreduce_router_grads once per step."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        block = _the_block(module, name)
        ep_group = _check_mesh(device_mesh, name, 1).get_group()
        _broadcast_weights(block, [ep_group], self.src_data_rank)
        return block.parallelize_(None, ep_group=ep_group, mesh=(device_mesh, (EP_DIM_NAME,)))


class MoEExpertTensorParallel(ParallelStyle):
    """EP x TP over a 2-D mesh: experts split over the `ep_dim` dimension as in MoEExpertParallel,
    each expert's columns over `tp_dim` as in MoETensorParallel (the ranks of one TP group hold the
    same tokens). Forward adds ONE all-reduce in the TP group to the EP exchange; backward too."""

    def __init__(self, *, ep_dim: str = EP_DIM_NAME, tp_dim: str = TP_DIM_NAME):
        super().__init__()
        self.ep_dim, self.tp_dim = ep_dim, tp_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        block = _the_block(module, name)
        mesh = _check_mesh(device_mesh, name, 2)
        names = tuple(mesh.mesh_dim_names or ())
        for role, dim in (("ep_dim", self.ep_dim), ("tp_dim", self.tp_dim)):
            if dim not in names:
                raise ValueError(f"{name}: {role} {dim!r} is not a dimension of the mesh {names}")
        ep_group, tp_group = mesh.get_group(self.ep_dim), mesh.get_group(self.tp_dim)
        _broadcast_weights(block, [ep_group, tp_group], self.src_data_rank)
        roles = tuple(EP_DIM_NAME if dim == self.ep_dim else TP_DIM_NAME for dim in names)
        return block.parallelize_(tp_group, ep_group=ep_group, mesh=(mesh, roles))


def _dims(mesh: DeviceMesh, tp: Optional[str], ep: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """The mesh dimensions `parallelize` uses for TP and EP (None: not used)."""
    names = tuple(mesh.mesh_dim_names or ())
    chosen = []
    for role, dim, default in (("tp", tp, TP_DIM_NAME), ("ep", ep, EP_DIM_NAME)):
        if dim is not None and dim not in names and dim != default:
            raise ValueError(f"{role}: expected a dimension of the mesh {names}, got {dim!r}")
        chosen.append(dim if dim in names else None)
    return chosen[0], chosen[1]


def parallelize(module: nn.Module, mesh: DeviceMesh, *, tp: Optional[str] = TP_DIM_NAME,
                ep: Optional[str] = EP_DIM_NAME, sequence_parallel: bool = False) -> nn.Module:
    """Parallelizes every tpmoe.MoEBlock inside `module` (itself included; a transformers model
    after tpmoe.hf.apply too) over `mesh`, in place, and returns `module`.

    The mesh dimension named `tp` shards each expert's columns, the one named `ep` the experts
    (both: EP x TP); a name absent from the mesh (or None) is not used, and every other dimension
    is left alone: data parallel, each of its ranks with its own tokens, the gradients summed over
    it by the caller (FSDP, DDP). A 1-D mesh without names is the TP mesh. The weights of the
    mesh's first rank are broadcast first (the styles' src_data_rank). The blocks' other modules
    (attention, embeddings) are the caller's: torch's own styles, in the same plan if wished.
    """
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel: expected a bool, got {type(sequence_parallel).__name__}")
    blocks = [block for block in module.modules() if isinstance(block, MoEBlock)]
    if not blocks:
        raise ValueError(f"module: expected tpmoe.MoEBlocks inside, found none in {type(module).__name__} "
                         f"(a transformers model: tpmoe.hf.apply(model) first)")
    if mesh.mesh_dim_names is None and mesh.ndim == 1:
        tp_dim, ep_dim, submesh = TP_DIM_NAME, None, mesh
    else:
        tp_dim, ep_dim = _dims(mesh, tp, ep)
        if tp_dim is None and ep_dim is None:
            raise ValueError(f"mesh: expected a dimension named {tp!r} (tensor parallel) or {ep!r} (expert parallel), "
                             f"got dimensions {mesh.mesh_dim_names}")
        submesh = mesh[(ep_dim, tp_dim)] if tp_dim and ep_dim else mesh[tp_dim or ep_dim]
    if ep_dim is not None and sequence_parallel:
        raise ValueError("sequence_parallel: expected False with expert parallelism (each rank's tokens are its own "
                         "already), got True")
    if ep_dim is not None and tp_dim is not None:
        style = MoEExpertTensorParallel(ep_dim=ep_dim, tp_dim=tp_dim)
    elif ep_dim is not None:
        style = MoEExpertParallel()
    else:
        style = MoETensorParallel(sequence_parallel=sequence_parallel)
    for block in blocks:
        parallelize_module(block, submesh, style)
    return module
