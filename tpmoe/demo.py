"""`make demo` for now: route a batch of random tokens through the native ops, check them
against their PyTorch twins, and run the expert block against the float64 reference."""
import argparse
import time

import torch

from .config import MoEConfig
from .fused import fused_experts
from .reference import reference_moe_block, reference_route
from .routing import align, route
from .routing_torch import align_torch, route_torch
from .weights import random_moe_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=60)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    T, E, K = args.tokens, args.experts, args.top_k
    logits = torch.randn(T, E, generator=generator)

    print(f"tpmoe demo: {T} random tokens, {E} experts, top-{K}\n")
    print(f"{'scoring':<14} {'native ms':>10} {'twin ms':>9} {'ids equal':>10} {'max |dw|':>10}")
    for scoring, extra in (("softmax", dict(renormalize=True)), ("topk_softmax", {}),
                           ("sigmoid_group", dict(renormalize=True, n_group=4, topk_group=2,
                                                  routed_scaling_factor=2.5,
                                                  correction_bias=torch.rand(E, generator=generator) / 10))):
        start = time.perf_counter()
        weights, ids = route(logits, K, scoring=scoring, **extra)
        native_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        twin_weights, twin_ids = route_torch(logits, K, scoring=scoring, **extra)
        twin_ms = (time.perf_counter() - start) * 1e3
        print(f"{scoring:<14} {native_ms:>10.2f} {twin_ms:>9.2f} {str(torch.equal(ids, twin_ids)):>10} "
              f"{(weights - twin_weights).abs().max().item():>10.1e}")
        if scoring == "softmax":
            softmax_ids = ids

    block_m = 16
    native = align(softmax_ids, E, block_m)
    twin = align_torch(softmax_ids, E, block_m)
    same = all(torch.equal(a, b) for a, b in zip(native, twin))
    counts = native.tokens_per_expert.tolist()
    print(f"\nalign (block_m={block_m}): all {len(native)} outputs equal to the twin: {same}; "
          f"padded rows {int(native.num_padded)} for {T * K} pairs")
    print("tokens per expert (softmax routing):")
    for row in range(0, E, 12):
        print("  " + " ".join(f"e{e:<3}{counts[e]:>5}" for e in range(row, min(row + 12, E))))

    config = MoEConfig(hidden_size=64, intermediate_size=48, num_experts=E, top_k=K, renormalize=True,
                       shared_intermediate_size=32, shared_expert_gate=True)
    block_weights = random_moe_weights(config, generator=generator)
    x = torch.randn(256, config.hidden_size, generator=generator)
    reference = reference_moe_block(x.double(), {k: v.double() for k, v in block_weights.items()}, config)
    topk_weights, topk_ids = route(x @ block_weights["router_weight"].t(), K, scoring="softmax", renormalize=True)
    experts = fused_experts(x, block_weights["w_gate_up"], block_weights["w_down"], topk_ids, topk_weights)
    ref_weights, ref_ids = reference_route(x.double() @ block_weights["router_weight"].double().t(), K,
                                           scoring="softmax", renormalize=True)
    print(f"\nrouted experts (fp32 CPU path) vs float64 reference, 256 tokens: ids equal "
          f"{torch.equal(topk_ids, ref_ids)}, block output max |diff| "
          f"{_routed_diff(experts, reference, x, block_weights, config):.2e}")
    return 0 if same else 1


def _routed_diff(experts, reference, x, weights, config):
    # The reference block adds the gated shared expert; subtract it to compare the routed part.
    x64 = x.double()
    gate_up = x64 @ weights["shared_gate_up"].double().t()
    gate, up = gate_up.chunk(2, dim=-1)
    shared = (torch.nn.functional.silu(gate) * up) @ weights["shared_down"].double().t()
    shared = shared * torch.sigmoid(x64 @ weights["shared_gate"].double().t())
    return (experts.double() - (reference - shared)).abs().max().item()


if __name__ == "__main__":
    raise SystemExit(main())
