"""The decode engine on tiny random models of every architecture it claims: logits against the
module path, bitwise invariance (window, padded batch, threads, prefill), generate, fallbacks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import TINY_COMMON, make_tiny

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime
from infertrix.quant.flattenquant import FlattenQuant

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]
KINDS = ["fp32", "w8a8", "w4a8", "w4a16", "w8a8_flat"]
# engine logits vs the module path's, max |diff| over the logits' std: the float kernels sum in
# another order (fp32: rounding only); on quantized layers a rounding difference can flip an int8
# activation code, which moves the logits by a quantization step (w4a16: a bfloat16 rounding step;
# w8a8_flat: one static step per tensor, coarser than a token's own: the module path alone moves by
# up to 5.4% of the logits' std when its embeddings are scaled by 1 + 1e-6 noise, measured)
TOLERANCE = {"fp32": 1e-5, "w8a8": 1e-3, "w4a8": 1e-3, "w4a16": 1e-2, "w8a8_flat": 0.1}


def tiny_gemma3(seed: int = 0, **overrides):
    """Gemma 3 text with sliding (window 8) and global layers, a local rotary base and a query
    scalar of its own, and random norm weights (they start at 0, where 1 + w hides the offset)."""
    model = make_tiny("gemma3", seed, query_pre_attn_scalar=24, rope_local_base_freq=100.0, **overrides)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(0.0, 0.3, generator=g)
    return model


def flattenquant() -> FlattenQuant:
    """FlattenQuant calibrated on random tokens, with budget enough to flatten channels of 64."""
    g = torch.Generator().manual_seed(1)
    return FlattenQuant(calibration_ids=torch.randint(3, 128, (4, 32), generator=g), flatten_budget=0.2,
                        progress=False)


def build(arch: str, kind: str = "fp32", seed: int = 0, engine: bool = True):
    if arch in ("llama", "qwen2"):
        model = make_tiny(arch, seed)
    elif arch == "gemma3":
        model = tiny_gemma3(seed)
    else:
        torch.manual_seed(seed)
        if arch == "qwen3":
            model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY_COMMON, head_dim=16)).eval()
        else:  # mistral with a sliding window shorter than the tests' sequences
            model = tf.MistralForCausalLM(tf.MistralConfig(**TINY_COMMON, sliding_window=7)).eval()
    recipe = {"fp32": [], "w8a8": ["w8a8(smooth_alpha=none)"], "w4a8": ["w4a8"], "w4a16": ["w4a16"],
              "w8a8_flat": [flattenquant()]}[kind]
    ix.optimize(model, *recipe, *(["engine"] if engine else []))
    return model


def run(model, ids, mask=None, cache=None, keep=0):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=keep, use_cache=True).logits


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_module_path(arch, kind):
    model = build(arch, kind)
    ids = tokens(20, 1)
    cache = EngineCache(model.config)
    got = torch.cat([run(model, ids[:, :12], cache=cache), run(model, ids[:, 12:17], cache=cache),
                     run(model, ids[:, 17:], cache=cache)], 1)
    assert engine_runtime(model).report()["engine_forwards"] == 3
    want = run(build(arch, kind, engine=False), ids)
    assert (got - want).abs().max() <= TOLERANCE[kind] * want.std(), (got - want).abs().max()


def _windows_equal(model, ids, full, first: int, width: int) -> None:
    cache = EngineCache(model.config)
    parts = [run(model, ids[:, :first], cache=cache)]
    for s in range(first, ids.shape[1], width):
        parts.append(run(model, ids[:, s : s + width], cache=cache))
    assert torch.equal(torch.cat(parts, 1), full), (first, width)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["fp32", "w4a8", "w4a16", "w8a8_flat"])
def test_window_and_thread_invariance(arch, kind):
    """Every position's logits are the same bits in the prompt, in 1-token steps, in windows of
    2..12 tokens, and at 1 or 2 threads."""
    windows_and_threads_equal(build(arch, kind), tokens(40, 2), range(1, 13))


def windows_and_threads_equal(model, ids: torch.Tensor, widths) -> None:
    """``ids`` run whole, then as a prompt and windows of each width, at 1 and 2 threads: the same
    logits bit for bit."""
    full = run(model, ids, cache=EngineCache(model.config))
    threads = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            for width in widths:
                _windows_equal(model, ids, full, first=3 + width, width=width)
    finally:
        torch.set_num_threads(threads)


def rows_equal_single_rows(model, rows: list[torch.Tensor], nxt: torch.Tensor) -> None:
    """``rows`` (1-D token tensors) as one left-padded batch, prefilled and then stepped one token at
    a time through ``nxt`` [batch, steps]: every row's logits are the bits of that row run alone."""
    batch, width = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    cache = EngineCache(model.config)
    prompt = run(model, ids, mask, cache)
    steps = [run(model, nxt[:, j : j + 1], torch.cat([mask, torch.ones(batch, j + 1, dtype=torch.long)], 1), cache)
             for j in range(nxt.shape[1])]
    for i, r in enumerate(rows):
        single = run(model, torch.cat([r[None], nxt[i : i + 1]], 1), cache=EngineCache(model.config))
        assert torch.equal(prompt[i, width - len(r) :], single[0, : len(r)]), (batch, i)
        for j in range(nxt.shape[1]):
            assert torch.equal(steps[j][i, 0], single[0, len(r) + j]), (batch, i, j)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_rows_equal_single_rows(arch, kind):
    model = build(arch, kind)
    lengths = [9, 4, 13, 1, 7]
    for batch in range(1, 6):
        rows = [tokens(n, 10 + i)[0] for i, n in enumerate(lengths[:batch])]
        rows_equal_single_rows(model, rows, torch.randint(3, 128, (batch, 3),
                                                          generator=torch.Generator().manual_seed(batch)))


def _generate(model, ids, mask=None, n=24):
    return model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["w4a8", "w8a8", "w8a8_flat"])
def test_prompt_lookup_is_token_identical_on_quantized_targets(arch, kind):
    """Speculative verification windows compute the same logits as 1-token steps, so greedy PLD
    equals plain greedy decoding on a quantized target."""
    ids = torch.cat([tokens(10, 3)] * 3, 1)  # repetition for the drafter to find
    plain = build(arch, kind)
    want = _generate(plain, ids)
    spec = build(arch, kind)
    ix.optimize(spec, "pld")
    got = _generate(spec, ids)
    assert torch.equal(got, want)
    assert engine_runtime(spec).report()["module_forwards"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_generate_batch_rows_equal_single_rows(arch):
    model = build(arch, "w4a8")
    rows = [tokens(6, 20)[0], tokens(11, 21)[0], tokens(3, 22)[0]]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 11 - len(r) :], mask[i, 11 - len(r) :] = r, 1
    batch = _generate(model, ids, mask, n=12)
    for i, r in enumerate(rows):
        single = _generate(model, r[None], n=12)[0, len(r) :]  # shorter when the row ends with EOS
        assert torch.equal(batch[i, 11 : 11 + len(single)], single)
        assert not batch[i, 11 + len(single) :].any()  # padding after it
    report = ix.describe(model).to_dict()["transforms"][-1]["report"]
    assert report["last_forward"] == "engine" and report["module_forwards"] == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_uses_engine_and_matches_module_greedy(arch):
    model = build(arch)
    ids = tokens(12, 4)
    got = _generate(model, ids)
    rt = engine_runtime(model)
    assert rt.report()["engine_forwards"] == 24 and rt.report()["module_forwards"] == 0
    ix.restore(model)
    assert torch.equal(got, _generate(model, ids))


def _fallback(model, why: str, **kwargs):
    rt = engine_runtime(model)
    before = rt.report()["module_forwards"]
    with torch.no_grad():
        model(input_ids=tokens(5, 0), cache=EngineCache(model.config), **kwargs)
    report = rt.report()
    assert report["module_forwards"] == before + 1
    assert any(why in k for k in report["fallbacks"]), report
    assert why in str(ix.describe(model)) or why in report["last_forward"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fallbacks_run_the_module_path_and_say_why(arch):
    model = build(arch)
    _fallback(model, "output_attentions", output_attentions=True)
    _fallback(model, "output_hidden_states", output_hidden_states=True)
    _fallback(model, "not left padding", attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    _fallback(model, "forward hooks on model.layers.1.mlp")
    handle.remove()
    ids = tokens(16, 7)  # longer than gemma3's sliding window
    with torch.no_grad():  # the module path keeps working on the engine's cache, and the engine after it
        cache = EngineCache(model.config)
        mixed = torch.cat([run(model, ids[:, :10], cache=cache),
                           model(input_ids=ids[:, 10:13], cache=cache, output_attentions=True).logits,
                           run(model, ids[:, 13:], cache=cache)], 1)
    torch.testing.assert_close(mixed, run(model, ids, cache=EngineCache(model.config)), rtol=1e-4, atol=1e-5)


def test_unsupported_models_and_caches_are_reported():
    torch.manual_seed(0)
    gemma2 = tf.Gemma2ForCausalLM(tf.Gemma2Config(**TINY_COMMON, head_dim=16)).eval()
    ix.optimize(gemma2, "engine")
    _generate(gemma2, tokens(5, 1), n=3)
    report = engine_runtime(gemma2).report()
    assert "gemma2" in report["model"] and report["engine_forwards"] == 0
    for option in ("attn_logit_softcapping", "final_logit_softcapping"):
        capped = tiny_gemma3(**{option: 30.0})
        ix.optimize(capped, "engine")
        _generate(capped, tokens(5, 1), n=3)
        report = engine_runtime(capped).report()
        assert option in report["model"] and report["engine_forwards"] == 0
    policy = build("llama")
    ix.restore(policy)
    ix.optimize(policy, "snapkv:0.5", "engine")
    _generate(policy, tokens(40, 2), n=3)
    assert any("PolicyCache" in k for k in engine_runtime(policy).report()["fallbacks"])
    swapped = make_tiny("llama")  # skip plans run on the engine (test_engine_skip.py); a hand swap does not
    swapped.model.layers[1].mlp = torch.nn.Identity()
    ix.optimize(swapped, "engine")
    _generate(swapped, tokens(5, 1), n=3)
    report = engine_runtime(swapped).report()
    assert report["model"].startswith("module path only: layer") and report["engine_forwards"] == 0


def test_opt_out_keeps_the_module_path():
    model = build("llama", engine=False)
    ix.optimize(model, "engine(enabled=false)")
    assert "forward" not in model.__dict__
    assert "disabled" in str(ix.describe(model))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_kernel_equals_its_reference(arch, kind):
    """The C++ engine_layer is the reference's sequence of ops, bit for bit (opcheck included)."""
    from infertrix.engine.runner import Runner
    from infertrix.ops import engine as E

    model = build(arch, kind)
    runner = Runner(model)
    b, t, index = 2, 37, 5  # more rows than the float kernel's chunk
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b * t, 64, generator=g)
    runner._tables(64, h)
    pos = torch.arange(index, index + t)[None].expand(b, t).contiguous()
    start = torch.tensor([0, 3])
    for lp in runner.layers[:2]:  # gemma3: a sliding layer (local rotary base, window) and a global one
        if kind in ("w8a8", "w4a8", "w8a8_flat"):  # q/k/v and gate/up fused: one slot each
            assert lp.ints[3:5] == [1, 1]
        a = E.rms_norm(h, lp.in_norm, lp.in_eps)
        caches = [torch.randn(b, 2, index + t, 16, generator=g) for _ in range(2)]
        args = (lp.tensors, lp.ints, lp.floats)
        tables = runner.tables[lp.rope]
        kc, vc = caches[0].clone(), caches[1].clone()
        got = E.engine_layer(h, a, *args, kc, vc, *tables, pos, start, index, b)
        kr, vr = caches[0].clone(), caches[1].clone()
        want = E.engine_layer_reference(h, a, *args, kr, vr, *tables, pos, start, index, b)
        assert all(torch.equal(x, y) for x, y in zip(got + (kc, vc), want + (kr, vr), strict=True))
        # the optional outputs the KV policies score with change nothing else
        heads, kvh, d = lp.ints[:3]
        outs = [torch.empty(b, heads, t, index + t), torch.empty(b, t, heads, d)]
        outs_ref = [torch.empty_like(x) for x in outs]
        kc, vc = caches[0].clone(), caches[1].clone()
        got2 = E.engine_layer(h, a, *args, kc, vc, *tables, pos, start, index, b, *outs)
        kr, vr = caches[0].clone(), caches[1].clone()
        E.engine_layer_reference(h, a, *args, kr, vr, *tables, pos, start, index, b, *outs_ref)
        assert all(torch.equal(x, y) for x, y in zip(got2 + tuple(outs), got + tuple(outs_ref), strict=True))
        if kind == "fp32":
            torch.library.opcheck(E.engine_layer, (h[:6], a[:6], *args, kc, vc, *tables, pos[:, :3], start, index, b))
            torch.library.opcheck(E.engine_layer, (h[:6], a[:6], *args, kc, vc, *tables, pos[:, :3], start, index, b,
                                                   torch.empty(b, heads, 3, index + 3), torch.empty(b, 3, heads, d)))


@pytest.mark.parametrize("kind", ["w8a8", "w4a8", "w4a16", "w8a8_flat"])
def test_each_slot_is_its_modules_outputs_bit_for_bit(kind):
    """Each packed slot (fused or not) computes exactly the original modules' outputs side by side:
    the kernels are row-wise and per output channel, so any slot or fusion mistake shows."""
    from infertrix.engine.runner import Runner
    from infertrix.ops import engine as E

    model = build("llama", kind)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for lp, layer in zip(Runner(model).layers, model.model.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        n_qkv, n_gu = lp.ints[3:5]
        groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]]
        slots = [n_qkv, 1, n_gu, 1]
        first = 0
        for mods, n in zip(groups, slots, strict=True):
            xin = x if mods[0].in_features == 64 else torch.randn(5, mods[0].in_features)
            with torch.no_grad():
                want = torch.cat([m(xin) for m in mods], -1)
            assert torch.equal(E._group(lp.tensors, lp.ints, first, n, xin), want), (kind, first)
            first += n
    # groups left apart are said (the tiny model's 32-wide k/v are not whole W4A16 blocks of 64)
    run(model, tokens(3, 0), cache=EngineCache(model.config))
    unfused = engine_runtime(model).report().get("unfused")
    assert (unfused is not None) == (kind == "w4a16"), unfused


def test_w4a16_fuses_whole_blocks_only():
    """torch's int4pack layout packs 64 output channels a block: whole blocks fuse bit for bit."""
    from infertrix.quant.int4 import quantize_int4
    from infertrix.quant.w4a16 import W4A16Linear

    def mods(*ns):
        g = torch.Generator().manual_seed(sum(ns))
        return [W4A16Linear.from_int4(quantize_int4(torch.randn(n, 128, generator=g), 64, False, two_level=False),
                                      None, torch.float32) for n in ns]

    x = torch.randn(3, 128)
    parts = mods(128, 64, 64)
    want = torch.cat([m(x) for m in parts], -1)
    fused = W4A16Linear.fuse(parts)
    assert torch.equal(fused(x), want) and torch.equal(torch.cat([m(x) for m in parts], -1), want)
    assert W4A16Linear.fuse(mods(64, 32, 32)) is None
