"""Low-bit experts (EdgeMoE): int8/int4 experts offloaded give exactly the outputs of the same
model with its experts quantized the same way in memory; the store's files round-trip; the cache
budget counts bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moe_models import make_moe
from torch import nn

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import SnapKV
from infertrix.moe import ExpertOffload, ExpertStore, find_moe_layers, offload_runtime
from infertrix.moe.expert_files import ALIGN
from infertrix.moe.lowbit import LowBitFormat
from infertrix.quant import W4A8

IDS = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77, 90, 3, 8, 11], [1, 7, 7, 7, 64, 65, 66, 100, 101, 6, 5, 4]])


class InMemoryLowBit(nn.Module):
    """A layer's experts quantized in memory, computed as transformers' eager experts loop does."""

    def __init__(self, experts: nn.Module, fmt: LowBitFormat):
        super().__init__()
        self.fmt, self.act_fn, self.num_experts = fmt, experts.act_fn, experts.gate_up_proj.shape[0]
        self.blobs = [fmt.encode(experts.gate_up_proj[j], experts.down_proj[j]) for j in range(self.num_experts)]
        self.parts = [fmt.views(b) for b in self.blobs]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e in (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist():
            if e >= self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            y = self.fmt.forward(self.parts[e], hidden_states[tok], self.act_fn) * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final


def _quantize_in_memory(model, bits: int, group_size: int = 32):
    for layer in find_moe_layers(model):
        fmt = LowBitFormat(bits, group_size, tuple(layer.experts.gate_up_proj.shape[1:]),
                           tuple(layer.experts.down_proj.shape[1:]))
        layer.block.experts = InMemoryLowBit(layer.experts, fmt)
    return model


def _outputs(model, new_tokens: int = 6):
    with torch.no_grad():
        logits = model(IDS).logits
    gen = model.generate(IDS[:1], max_new_tokens=new_tokens, do_sample=False)
    return logits, gen


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "kwargs",
    [dict(experts_per_layer=2, prefetch=True), dict(experts_per_layer=2, miss_policy="in_place", tier="host")],
)
def test_offloaded_lowbit_equals_quantized_in_memory(arch, bits, kwargs):
    plain_logits, _ = _outputs(make_moe(arch, implementation="eager"))
    ref_logits, ref_gen = _outputs(_quantize_in_memory(make_moe(arch, implementation="eager"), bits))
    assert (ref_logits - plain_logits).abs().max() > 1e-5  # the quantization really changes the outputs
    model = make_moe(arch, implementation="eager")
    ix.optimize(model, ExpertOffload(expert_bits=bits, **kwargs))
    logits, gen = _outputs(model)
    assert torch.equal(logits, ref_logits)  # same kernel, same rows, same order: bit-identical
    assert torch.equal(gen, ref_gen)
    st = offload_runtime(model).cache.stats()
    assert st.misses > 0  # the experts really came from the store
    ix.restore(model)


def test_grouped_mm_models_close_to_quantized_in_memory():
    ref_logits, ref_gen = _outputs(_quantize_in_memory(make_moe("qwen3_moe", implementation="eager"), 4))
    model = make_moe("qwen3_moe")  # grouped_mm: outputs summed per (token, k), another order
    ix.optimize(model, ExpertOffload(expert_bits=4, experts_per_layer=2))
    logits, gen = _outputs(model)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("bits", [8, 4])
def test_store_round_trip(bits, tmp_path):
    from safetensors import safe_open

    model = make_moe("mixtral")
    layers = find_moe_layers(model)
    store = ExpertStore.from_model(model, tmp_path / "s", bits=bits)
    fmt = store.format
    assert (store.bits, fmt.bits, store.dtype) == (bits, bits, torch.float32)
    assert store.gate_up_shape == tuple(layers[0].experts.gate_up_proj.shape[1:])
    assert store.expert_bytes == fmt.nbytes and fmt.nbytes % ALIGN == 0
    float_bytes = layers[0].experts.gate_up_proj[0].nbytes + layers[0].experts.down_proj[0].nbytes
    assert store.expert_bytes < float_bytes / (3 if bits == 8 else 5)  # tiny experts: page padding counts
    for layer in layers:
        for j in range(layer.num_experts):
            want = fmt.encode(layer.experts.gate_up_proj[j], layer.experts.down_proj[j])
            blob = torch.empty(store.expert_bytes, dtype=torch.uint8)
            assert store.read_into(layer.index, j, blob) == store.expert_bytes
            assert torch.equal(blob, want)
            (viewed,) = store.view(layer.index, j)
            assert torch.equal(viewed, want)
            store.release(layer.index, j)
    with safe_open(str(tmp_path / "s" / "layer_001.safetensors"), "pt") as f:  # still plain safetensors
        assert torch.equal(f.get_tensor("e0003.lowbit"), fmt.encode(layers[1].experts.gate_up_proj[3],
                                                                    layers[1].experts.down_proj[3]))
    gu, dn = store.load_layer(2)  # restore's view: the dequantized experts
    want_gu, want_dn = fmt.decode(fmt.views(fmt.encode(layers[2].experts.gate_up_proj[5], layers[2].experts.down_proj[5])))
    assert torch.equal(gu[5], want_gu) and torch.equal(dn[5], want_dn)
    assert (gu - layers[2].experts.gate_up_proj).abs().max() < 0.2 * layers[2].experts.gate_up_proj.abs().max()
    store.close()

    again = ExpertStore.open(tmp_path / "s", tier="host")  # reopened: same format, same bytes
    assert again.format.spec() == fmt.spec()
    blob = torch.empty(again.expert_bytes, dtype=torch.uint8)
    again.read_into(1, 3, blob)
    assert torch.equal(blob, fmt.encode(layers[1].experts.gate_up_proj[3], layers[1].experts.down_proj[3]))
    again.close()

    model.save_pretrained(tmp_path / "ckpt")  # from a checkpoint: the same files
    ck = ExpertStore.from_checkpoint(tmp_path / "ckpt", tmp_path / "c", bits=bits)
    for i in ck.layers:
        assert (tmp_path / "c" / f"layer_{i:03d}.safetensors").read_bytes() == (
            tmp_path / "s" / f"layer_{i:03d}.safetensors").read_bytes()
    ck.close()


def test_cache_budget_counts_bytes():
    model = make_moe("mixtral", experts=16)
    layers = len(find_moe_layers(model))
    ix.optimize(model, ExpertOffload(budget=0.25, prefetch=False))
    float_cache = offload_runtime(model).cache
    float_bytes, budget = float_cache.store.expert_bytes, float_cache.budget_bytes
    assert float_cache.capacity == 4
    ix.restore(model)
    for bits in (8, 4):
        # the same fraction of the float experts' bytes holds budget // expert_bytes low-bit experts
        ix.optimize(model, ExpertOffload(budget=0.25, expert_bits=bits, prefetch=False))
        cache = offload_runtime(model).cache
        n = cache.store.expert_bytes
        assert cache.capacity == min(16, 4 * float_bytes // n) > 4
        assert cache.budget_bytes == cache.capacity * n * layers <= budget
        slots = [lc.buffers[0] for lc in cache.layers.values()]
        assert sum(s.nbytes for s in slots) == cache.budget_bytes
        assert all(s.data_ptr() % ALIGN == 0 and s.shape == (cache.capacity, n) for s in slots)
        ix.restore(model)
        # an explicit byte budget
        ix.optimize(model, ExpertOffload(budget_bytes=3 * n * layers + n - 1, expert_bits=bits, prefetch=True))
        cache = offload_runtime(model).cache
        assert cache.capacity == 3
        model.generate(IDS[:1], max_new_tokens=8, do_sample=False)
        rt = offload_runtime(model)
        rt.prefetcher.stop()
        s = cache.stats()
        assert s.bytes_read == (s.fetched + s.prefetched) * n and s.misses > 0
        report = ix.describe(model).transforms[0]["report"]
        assert report["expert_bits"] == bits and report["bytes_per_expert"] == n
        assert report["stats"]["bytes_read"] == s.bytes_read
        ix.restore(model)


def test_composes_with_w4a8_and_kv_policy():
    policy = dict(window_size=4, compression=0.5)
    prompt = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    ref = make_moe("mixtral", implementation="eager")
    ix.optimize(ref, W4A8(group_size=32), SnapKV(**policy))
    _quantize_in_memory(ref, 4)
    ref_gen = ref.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model = make_moe("mixtral", implementation="eager")
    ix.optimize(model, W4A8(group_size=32), ExpertOffload(expert_bits=4, experts_per_layer=2), SnapKV(**policy))
    gen = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, ref_gen)
    assert offload_runtime(model).cache.stats().misses > 0
    ix.restore(model)


def test_restore_and_errors(tmp_path):
    model = make_moe("mixtral")
    layers = find_moe_layers(model)
    fmt = LowBitFormat(4, 32, tuple(layers[0].experts.gate_up_proj.shape[1:]), tuple(layers[0].experts.down_proj.shape[1:]))
    want = fmt.decode(fmt.views(fmt.encode(layers[0].experts.gate_up_proj[1], layers[0].experts.down_proj[1])))
    ix.optimize(model, ExpertOffload(expert_bits=4, store_dir=str(tmp_path / "s")))
    ix.restore(model)  # the experts come back dequantized (the store keeps only the int4 codes)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[1], want[0])
    with pytest.raises(ConfigError, match="holds 4-bit experts"):
        ix.optimize(model, ExpertOffload(expert_bits=8, store_dir=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="expert_bits"):
        ExpertOffload(expert_bits=3)
