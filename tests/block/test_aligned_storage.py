"""Expert weights kept with 16-byte aligned rows (tpmoe.sharding.aligned_storage): the padding is
invisible to the math, the state dict, torch.save, load_state_dict, gather_full, from_shards,
the optimizer and the transformers adapter's checkpoint.

Blocks pad on CUDA only (ALIGNED_DEVICE_TYPES); these tests turn it on for the CPU so that the
padded storage is exercised without a GPU, and compare every result with a block built from
the same weights without padding.
"""
import io
from dataclasses import replace

import pytest
import torch

import tpmoe
import tpmoe.sharding as sharding
from support.dist_utils import run_distributed
from tpmoe.sharding import ALIGNED_NAMES, aligned_storage
from tpmoe.stacked import to_stacked

# Uneven shards with unaligned rows: 38 columns over 3 ranks are 13, 13, 12, the shared expert's 10
# over 3 are 4, 3, 3 (rows of w_down and shared_down padded to 16 elements; H = 32 is aligned).
CONFIG = tpmoe.MoEConfig(hidden_size=32, intermediate_size=38, num_experts=4, top_k=2,
                         shared_intermediate_size=10, shared_expert_gate=True)


@pytest.fixture
def pad_on_cpu(monkeypatch):
    monkeypatch.setattr(sharding, "ALIGNED_DEVICE_TYPES", ("cpu", "cuda"))


def _row_aligned(tensor):
    """Every stride but the unit one is a multiple of 16 elements (so of 16 bytes), as the JIT
    must see it to keep 16-byte copies."""
    return all(stride % 16 == 0 for stride in tensor.stride() if stride != 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape, permutation", [((3, 5, 77), None), ((3, 154, 6), None), ((5, 7), None),
                                                 ((3, 77, 6), (0, 2, 1))])
def test_aligned_storage_keeps_values_shape_and_memory_order(dtype, shape, permutation, seed):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if permutation:
        tensor = tensor.permute(*permutation)
    aligned = aligned_storage(tensor)
    assert aligned.shape == tensor.shape and aligned.dtype == tensor.dtype
    assert torch.equal(aligned, tensor)
    assert _row_aligned(aligned) and aligned.data_ptr() % 16 == 0
    # The same memory order: the unit-stride dimension stays the unit-stride one.
    assert aligned.stride().index(1) == tensor.stride().index(1)
    # The padding is zeros, and a second call changes nothing.
    storage = torch.empty(0, dtype=dtype).set_(aligned.untyped_storage())
    assert storage.count_nonzero() == tensor.count_nonzero()
    assert aligned_storage(aligned) is aligned


def test_aligned_row_stride_is_a_multiple_of_16_elements():
    """16 elements, not only 16 bytes: 2 I_p = 308 bf16 rounded to 16 bytes is 312, which the JIT
    does not mark divisible (its copies then stay narrow)."""
    assert [sharding.aligned_row_stride(columns, 2) for columns in (154, 308, 77, 768, 1)] == [160, 320, 80, 768, 16]
    assert sharding.aligned_row_stride(13, 4) == 16 and sharding.aligned_row_stride(16, 8) == 16
    with pytest.raises(ValueError, match="element_size"):
        sharding.aligned_row_stride(10, 0)


def test_aligned_storage_returns_aligned_and_degenerate_tensors_themselves():
    for tensor in (torch.zeros(4, 16), torch.zeros(3, 2, 32, dtype=torch.bfloat16), torch.zeros(7), torch.zeros(0, 5),
                   torch.zeros(3, 5)[:, ::2], torch.zeros(5, 3, 16).permute(0, 2, 1)):
        assert aligned_storage(tensor) is tensor
    with pytest.raises(TypeError, match="tensor: expected a torch.Tensor"):
        aligned_storage([1.0, 2.0])


def _full_weights(seed, dtype=torch.float32):
    return tpmoe.random_moe_weights(CONFIG, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_block_state_dict_save_load_and_from_shards_see_no_padding(pad_on_cpu, seed):
    # One rank's shard is itself a block of I_p columns: a shard of CONFIG over 3 ranks.
    config = replace(CONFIG, intermediate_size=13, shared_intermediate_size=3)
    shards = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(seed))
    block = tpmoe.MoEBlock.from_shards(config, shards)
    # The parameters and the state dict hold the stacked layout (gate and up on their own axis).
    stacked = {name: to_stacked(config, name, tensor) for name, tensor in shards.items()}
    padded = [name for name in ALIGNED_NAMES if not getattr(block, name).is_contiguous()]
    assert padded == ["w_down", "shared_down"], padded  # the weights whose rows were unaligned
    for name in ALIGNED_NAMES:
        assert _row_aligned(getattr(block, name)), name
    # state_dict and torch.save: the logical shapes and values.
    state = block.state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == {name: tuple(t.shape) for name, t in stacked.items()}
    for name, tensor in stacked.items():
        assert torch.equal(state[name], tensor), name
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    for name, tensor in stacked.items():
        assert tuple(loaded[name].shape) == tuple(tensor.shape) and torch.equal(loaded[name], tensor), name
    # load_state_dict into another padded block: values copied, storage still padded and aligned.
    other = tpmoe.MoEBlock(config, seed=seed + 1)
    assert not torch.equal(other.w_down, block.w_down)
    other.load_state_dict(loaded)
    for name, tensor in stacked.items():
        assert torch.equal(getattr(other, name), tensor), name
    for name in ALIGNED_NAMES:
        assert _row_aligned(getattr(other, name)), name
    # A compact (unpadded) block loads the padded block's state dict too.
    sharding.ALIGNED_DEVICE_TYPES = ()
    compact = tpmoe.MoEBlock(config, seed=seed + 1)
    compact.load_state_dict(block.state_dict())
    for name, tensor in stacked.items():
        assert torch.equal(getattr(compact, name), tensor), name
    # from_shards of the block's own shards, and gather_full, give the same weights, compact.
    sharding.ALIGNED_DEVICE_TYPES = ("cpu",)
    again = tpmoe.MoEBlock.from_shards(config, block.local_shards())
    for name, tensor in again.local_shards().items():
        assert torch.equal(tensor, shards[name]), name
    for name, tensor in block.gather_full().items():
        assert torch.equal(tensor, shards[name]) and tensor.is_contiguous(), name


def test_optimizer_and_module_to_keep_padding_zero_and_rows_aligned(pad_on_cpu, seed):
    block = tpmoe.MoEBlock.from_full(CONFIG, _full_weights(seed))
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(9, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    for _ in range(2):
        optimizer.zero_grad()
        block(x).square().sum().backward()
        assert block.w_down.grad.shape == block.w_down.shape
        optimizer.step()
    for name in ALIGNED_NAMES:
        parameter = getattr(block, name)
        storage = torch.empty(0, dtype=parameter.dtype).set_(parameter.untyped_storage())
        assert storage.count_nonzero() == parameter.count_nonzero(), f"{name}: the padding changed"
        assert _row_aligned(parameter), name
    # .to() copies compactly; the block re-pads on the new dtype (and would on a new device).
    values = {name: getattr(block, name).detach().double() for name in ALIGNED_NAMES}
    block.to(torch.float64)
    for name in ALIGNED_NAMES:
        parameter = getattr(block, name)
        assert parameter.dtype == torch.float64 and _row_aligned(parameter), name
        assert torch.equal(parameter, values[name]), name


def test_blocks_do_not_pad_on_the_cpu_by_default(seed):
    block = tpmoe.MoEBlock.from_full(CONFIG, _full_weights(seed))
    assert all(getattr(block, name).is_contiguous() for name in ALIGNED_NAMES)


def _padded_vs_compact(rank, world_size, seed):
    """A TP forward and backward of the same block with and without padded storage: equal bitwise."""
    full = _full_weights(seed)
    x = torch.randn(11, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    dy = torch.randn(11, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed + 2))
    group = torch.distributed.group.WORLD
    results = []
    for device_types in ((), ("cpu",)):
        sharding.ALIGNED_DEVICE_TYPES = device_types
        block = tpmoe.MoEBlock.from_full(CONFIG, full, group=group)
        padded = not block.local_shards()["w_down"].is_contiguous()  # the DTensor's local tensor
        assert padded == bool(device_types) or block.I_local % 16 == 0
        inputs = x.clone().requires_grad_(True)
        y = block(inputs)
        y.backward(dy)
        results.append((y.detach(), inputs.grad, block.local_grads()))
        if device_types:
            gathered = block.gather_full()  # one all-gather (every rank joins) of the padded shards
            assert all(torch.equal(tensor, full[name]) for name, tensor in gathered.items())
    (y0, dx0, grads0), (y1, dx1, grads1) = results
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    for name, grad in grads0.items():
        assert torch.equal(grad, grads1[name]), name
    return True


def test_tp_forward_backward_with_padded_shards_equals_unpadded(seed):
    assert run_distributed(_padded_vs_compact, 3, seed) == [True] * 3


def test_triton_kernels_read_padded_weights(pad_on_cpu, seed):
    """The Triton path (interpreted here) takes the padded strides: the same result as compact weights."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    config = tpmoe.MoEConfig(hidden_size=32, intermediate_size=22, num_experts=4, top_k=2)
    full = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(6, config.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    outputs = []
    for device_types in ((), ("cpu",)):
        sharding.ALIGNED_DEVICE_TYPES = device_types
        block = tpmoe.MoEBlock.from_full(config, full, backend="triton")
        assert block.w_down.is_contiguous() == (not device_types)
        inputs = x.clone().requires_grad_(True)
        y = block(inputs)
        y.square().sum().backward()
        outputs.append((y.detach(), inputs.grad, block.w_down.grad, block.w_gate_up.grad))
    for compact, padded in zip(*outputs):
        assert torch.equal(compact, padded)


def test_hf_checkpoint_of_padded_blocks_loads_bit_for_bit(pad_on_cpu, seed, tmp_path):
    pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")
    import copy

    import tpmoe.hf
    from support.hf_models import make_hf_causal_lm

    hf_model = make_hf_causal_lm("qwen2_moe", seed)  # routed and shared expert
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped)
    block = swapped.get_submodule(report[0].name).block
    assert not block.w_down.is_contiguous() and not block.shared_down.is_contiguous()
    state_dict = tpmoe.hf.gather_state_dict(swapped)
    original = hf_model.state_dict()
    assert sorted(state_dict) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(state_dict[name], tensor), name
    swapped.save_pretrained(tmp_path, state_dict=state_dict)
    reloaded = type(hf_model).from_pretrained(tmp_path, experts_implementation="eager")
    for name, tensor in original.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
