"""GPTQ-calibrated low-bit experts (``ExpertOffload(expert_gptq=True)``, ``moe.calibrate``)."""

from __future__ import annotations

import pytest
import torch
from moe_models import make_moe

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.moe import ExpertOffload, find_moe_layers, offload_runtime
from infertrix.moe.calibrate import routed_inputs
from infertrix.moe.lowbit import LowBitFormat

CALIB = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(5))


def _output_error(fmt: LowBitFormat, w: torch.Tensor, h: torch.Tensor, blob: torch.Tensor, mat: int) -> float:
    """GPTQ's objective: the squared error of the matrix's outputs over the routed inputs, tr(E H E^T)."""
    e = fmt.decode(fmt.views(blob))[mat] - w
    return float(torch.einsum("nk,kl,nl->", e.double(), h.double(), e.double()))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_lowers_each_matrix_output_error_on_its_routed_tokens(arch, bits):
    model = make_moe(arch)
    layers = find_moe_layers(model)
    seen = routed_inputs(model, layers, CALIB, progress=False)
    rtn_total = gptq_total = 0.0
    for layer in layers:
        e = layer.experts
        fmt = LowBitFormat(bits, 32, tuple(e.gate_up_proj.shape[1:]), tuple(e.down_proj.shape[1:]))
        for j in range(layer.num_experts):
            hs = seen.hessians(layer, j)
            if hs is None:
                continue
            ws = (e.gate_up_proj[j].detach(), e.down_proj[j].detach())
            rtn, gptq = fmt.encode(*ws), fmt.encode(*ws, hessians=hs)
            for mat in (0, 1):
                rtn_total += _output_error(fmt, ws[mat], hs[mat], rtn, mat)
                gptq_total += _output_error(fmt, ws[mat], hs[mat], gptq, mat)
    assert gptq_total < 0.9 * rtn_total, (gptq_total, rtn_total)


def test_hessians_are_the_routed_tokens_own():
    """An expert's Hessians are sums over exactly the rows its router chose (top-k, any slot)."""
    model = make_moe("mixtral")
    layer = find_moe_layers(model)[1]
    seen = routed_inputs(model, [layer], CALIB, progress=False)
    hidden, chosen = seen.hidden[layer.index], seen.chosen[layer.index]
    assert hidden.shape[0] == CALIB.numel() and chosen.shape == (CALIB.numel(), layer.top_k)
    j = int(torch.bincount(chosen.flatten()).argmax())  # the expert most tokens reached
    x = hidden[(chosen == j).any(-1)].double()
    h_gu, h_down = seen.hessians(layer, j)
    torch.testing.assert_close(h_gu, (x.t() @ x).float())
    gate, up = (x @ layer.experts.gate_up_proj[j].detach().double().t()).chunk(2, -1)
    mid = layer.experts.act_fn(gate) * up
    torch.testing.assert_close(h_down, (mid.t() @ mid).float())


def test_offload_with_gptq_stores_gptq_codes_and_refuses_mismatched_stores(tmp_path):
    """The stored blobs are GPTQ's from each expert's routed tokens (nearest below MIN_TOKENS, counted
    exactly); describe() says so; a store is reused only with the same rounding and settings."""
    from infertrix.moe.calibrate import MIN_TOKENS

    ref = make_moe("mixtral")
    layers = find_moe_layers(ref)
    seen = routed_inputs(ref, layers, CALIB, progress=False)
    counts = {(layer.index, j): seen.tokens(layer.index, j).shape[0] for layer in layers for j in range(8)}
    few = sum(n < MIN_TOKENS for n in counts.values())
    model = make_moe("mixtral")
    ix.optimize(model, ExpertOffload(expert_bits=4, expert_gptq=True, calibration_ids=CALIB, experts_per_layer=2,
                                     store_dir=str(tmp_path / "s"), progress=False))
    store = offload_runtime(model).cache.store
    assert store.rounding_note.startswith("gptq") and "damp 0.01" in store.rounding_note
    assert store.manifest["uncalibrated_experts"] == few
    assert "gptq" in str(ix.describe(model))
    fmt = store.format
    for (i, j), n in counts.items():  # each blob: GPTQ from its own tokens, or nearest below MIN_TOKENS
        e = layers[[x.index for x in layers].index(i)].experts
        want = fmt.encode(e.gate_up_proj[j], e.down_proj[j], seen.hessians(layers[[x.index for x in layers].index(i)], j))
        assert torch.equal(store.view(i, j)[0], want), (i, j, n)
        store.release(i, j)
    ix.restore(model)
    with pytest.raises(ConfigError, match="'gptq' rounding, not 'nearest'"):
        ix.optimize(model, ExpertOffload(expert_bits=4, store_dir=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="damp"):
        ix.optimize(model, ExpertOffload(expert_bits=4, expert_gptq=True, damp=0.1, calibration_ids=CALIB,
                                         store_dir=str(tmp_path / "s")))
    with pytest.raises(ConfigError, match="expert_group_size"):
        ix.optimize(model, ExpertOffload(expert_bits=4, expert_gptq=True, expert_group_size=16, calibration_ids=CALIB,
                                         store_dir=str(tmp_path / "s")))
    ix.optimize(model, ExpertOffload(expert_bits=4, store_dir=str(tmp_path / "r")))
    ix.restore(model)
    with pytest.raises(ConfigError, match="'nearest' rounding, not 'gptq'"):
        ix.optimize(model, ExpertOffload(expert_bits=4, expert_gptq=True, calibration_ids=CALIB,
                                         store_dir=str(tmp_path / "r")))


def test_gptq_needs_low_bits_and_data():
    with pytest.raises(ConfigError, match="expert_bits=8 or 4"):
        ExpertOffload(expert_gptq=True)
    with pytest.raises(ConfigError, match="tokenizer=tok, calibration_ids"):
        ix.optimize(make_moe("mixtral"), ExpertOffload(expert_bits=4, expert_gptq=True))
    (t,) = ix.core.recipe.parse_recipe("offload:0.25(expert_bits=4, expert_gptq=true)")
    assert t.expert_gptq and t.expert_bits == 4


@pytest.mark.parametrize("gptq,prefetch", [(False, False), (True, True)])
def test_int8_layers_are_the_measured_costliest_with_fewer_slots(gptq, prefetch):
    """int8_layers=1: the layer whose int4 experts move the next-token distributions most (KL on
    the calibration windows) is stored in int8 (measured, kept in the manifest), its cache holds fewer of the wider experts in the same
    bytes (a tenth of the float experts), and the outputs are those of the same widths in memory."""
    from test_lowbit import IDS, InMemoryLowBit

    model = make_moe("mixtral")
    ix.optimize(model, ExpertOffload(budget=0.1, expert_bits=4, int8_layers=1, expert_gptq=gptq, calibration_ids=CALIB,
                                     prefetch=prefetch, progress=False))
    cache = offload_runtime(model).cache
    store = cache.store
    costs = {int(i): c for i, c in store.manifest["layer_costs"].items()}
    top = max(costs, key=costs.get)
    assert list(store.layer_formats) == [top] and store.format_of(top).bits == 8
    assert all(store.format_of(i).bits == 4 for i in store.layers if i != top)
    assert all(cache.capacities[top] < cache.capacities[i] for i in store.layers if i != top)
    for i, lc in cache.layers.items():  # every layer within its share: a tenth of its float experts. bytes
        assert lc.buffers[0].shape == (cache.capacities[i], store.bytes_of(i))
        assert lc.buffers[0].nbytes <= 0.1 * 8 * 3 * 64 * 96 * 4
    report = next(t["report"] for t in ix.describe(model).to_dict()["transforms"] if "int8_layers" in t["report"])
    assert report["int8_layers"] == [top] and "by width" in report["resident"]
    with torch.no_grad():
        got = model(IDS).logits
    model.generate(IDS[:1], max_new_tokens=6, do_sample=False)  # prefetch guesses as many as each layer holds
    assert all(len(lc.slot_of) <= cache.capacities[i] for i, lc in cache.layers.items())
    blobs = {i: store.view(i, 1)[0].clone() for i in store.layers}  # expert 1 of each layer, as stored
    ix.restore(model)  # each layer's experts come back decoded from its own width
    for layer in find_moe_layers(model):
        fmt = store.format_of(layer.index)
        assert torch.equal(layer.experts.gate_up_proj[1], fmt.decode(fmt.views(blobs[layer.index]))[0])
    if not gptq:  # round to nearest: the same codes in memory, bit for bit
        ref = make_moe("mixtral")

        def log_probs():  # one window a forward, as layer_costs runs them
            with torch.no_grad():
                return torch.stack([torch.log_softmax(ref(row[None]).logits[0].float(), -1) for row in CALIB])

        plain = log_probs()
        layers = find_moe_layers(ref)
        e = layers[0].experts
        fmt = LowBitFormat(4, 32, tuple(e.gate_up_proj.shape[1:]), tuple(e.down_proj.shape[1:]))
        for layer in layers:  # the measured cost: one layer alone at int4
            layer.block.experts = InMemoryLowBit(layer.experts, fmt)
            kl = float((plain.exp() * (plain - log_probs())).sum(-1).mean())
            assert kl == pytest.approx(costs[layer.index], rel=1e-3, abs=1e-9)
            layer.block.experts = layer.experts
        for layer in layers:
            bits = 8 if layer.index == top else 4
            layer.block.experts = InMemoryLowBit(layer.experts, LowBitFormat(bits, 32, fmt.gate_up_shape, fmt.down_shape))
        with torch.no_grad():
            assert torch.equal(got, ref(IDS).logits)


def test_int8_layers_refusals(tmp_path):
    with pytest.raises(ConfigError, match="expert_bits=4"):
        ExpertOffload(expert_bits=8, int8_layers=1)
    with pytest.raises(ConfigError, match="use expert_bits=8"):
        ix.optimize(make_moe("mixtral"), ExpertOffload(expert_bits=4, int8_layers=3, calibration_ids=CALIB))
    from infertrix.moe import load_offloaded

    with pytest.raises(ConfigError, match="from_pretrained"):
        load_offloaded(tmp_path, ExpertOffload(expert_bits=4, expert_gptq=True, store_dir=str(tmp_path / "x")))
    model = make_moe("mixtral")
    ix.optimize(model, ExpertOffload(expert_bits=4, int8_layers=1, calibration_ids=CALIB, store_dir=str(tmp_path / "s"),
                                     progress=False))
    ix.restore(model)
    with pytest.raises(ConfigError, match="not int8_layers=0"):
        ix.optimize(model, ExpertOffload(expert_bits=4, store_dir=str(tmp_path / "s")))
