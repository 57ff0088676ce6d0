"""Train a small model built from tpmoe MoEBlocks under tensor parallelism.

    torchrun --nproc-per-node 2 examples/train_tp.py                      # TP: tokens replicated
    torchrun --nproc-per-node 2 examples/train_tp.py --sequence-parallel  # tokens sharded between blocks

gloo on CPU, NCCL when CUDA is there (one GPU per rank). A student stack of MoE blocks learns
to imitate a fixed random teacher stack (the same config); rank 0 prints the loss per step.
Every rank holds 1/P of each expert's intermediate columns; the router is replicated and, in
TP mode, gets identical gradients on every rank with no extra collective, so the replicas stay
in sync by construction. In sequence-parallel mode the replicated gradients are partial sums
over each rank's tokens: `allreduce_router_grads` sums them, once per step for all blocks.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from tpmoe import MoEConfig
from tpmoe.block import MoEBlock
from tpmoe.distributed import allreduce_router_grads, check_replicated, destroy_process_group_collected


class ResidualMoEStack(nn.Module):
    """x -> x + block(x), `num_layers` times."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, **kwargs):
        for block in self.blocks:
            x = x + block(x, **kwargs)
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per step (the whole batch)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("start it with torchrun, which sets RANK and WORLD_SIZE for each process: "
                     "torchrun --nproc-per-node 2 examples/train_tp.py")

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    group = dist.group.WORLD

    config = MoEConfig(hidden_size=32, intermediate_size=48, num_experts=8, top_k=2, renormalize=True,
                       shared_intermediate_size=16, shared_expert_gate=True)
    # Same seeds on every rank: the replicated router starts identical, each rank keeps its slice.
    student = ResidualMoEStack([MoEBlock(config, group, seed=layer, device=device,
                                         sequence_parallel=args.sequence_parallel)
                                for layer in range(args.layers)])
    teacher = ResidualMoEStack([MoEBlock(config, None, seed=1000 + layer, device=device)
                                for layer in range(args.layers)]).requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)

    tokens_per_rank = [args.tokens // world_size + (1 if r < args.tokens % world_size else 0)
                       for r in range(world_size)]
    first = sum(tokens_per_rank[:rank])
    local_rows = slice(first, first + tokens_per_rank[rank])
    # One fixed batch, the same on every rank (same seed): the loss then falls step by step.
    # Sequence-parallel ranks keep their own rows of it.
    inputs = torch.randn(args.tokens, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        targets = teacher(inputs)
    for step in range(args.steps):
        x, target = inputs, targets
        if args.sequence_parallel:
            x, target = x[local_rows], target[local_rows]
            output = student(x, tokens_per_rank=tokens_per_rank)
        else:
            output = student(x)
        squared_error = (output - target).pow(2).sum()
        loss = squared_error / (args.tokens * config.hidden_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.sequence_parallel:
            allreduce_router_grads(student)
            reported = squared_error.detach().clone()
            dist.all_reduce(reported, group=group)  # for printing only: the loss over all tokens
            reported = reported / (args.tokens * config.hidden_size)
        else:
            reported = loss.detach()
        optimizer.step()
        if rank == 0:
            print(f"step {step:3d}  loss {reported.item():.6f}", flush=True)
    # The replicas of the router (and of the other replicated parameters) must not have drifted.
    for index, block in enumerate(student.blocks):
        replicated = {name: getattr(block, name) for name in ("router_weight", "shared_gate") if hasattr(block, name)}
        check_replicated(replicated, group, what=f"after training, block {index}")
    if rank == 0:
        print("replicated parameters identical on every rank", flush=True)
    # Every rank past its last collective, then nothing here referencing the group, before it is
    # destroyed while the interpreter is alive (see destroy_process_group_collected).
    dist.barrier(group)
    del student, teacher, optimizer, group
    destroy_process_group_collected()


if __name__ == "__main__":
    main()
