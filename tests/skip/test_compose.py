"""Skip transforms composed with the real W4A8 quantization and KV-cache transforms through ``optimize``.

Each composition is checked against a hand-composed reference on a twin model (the same tiny model
with W4A8 and the KV-cache transform, the skip plan entered by hand with ``plan.active``), for KV
memory (skipped attention stores nothing, also under an eviction policy or KV quantization), and for
an exact restore.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.kvcache import new_cache
from infertrix.quant import W4A8
from infertrix.skip import (
    AdaSkip,
    AttentionDrop,
    ShortGPT,
    SkipDecode,
    SkipPlan,
    UniformSkip,
    skipping,
)

KV = ["snapkv:0.5", "streamingllm", "kivi:4"]
LAYERS = 8
PROMPT = 80  # SnapKV keeps a 32-token window: 0.5 of the prompt must be at least that
NEW = 6


def ids(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def quant() -> W4A8:
    # round-to-nearest (no GPTQ): deterministic, needs no data; the decoder layers only
    return W4A8(group_size=32, quantize_lm_head=False)


METHODS = {
    "uniform": lambda: UniformSkip(count=2),
    "shortgpt": lambda: ShortGPT(count=2, calibration_ids=ids(64), progress=False),
    "attn_drop": lambda: AttentionDrop(count=2, calibration_ids=ids(64), progress=False),
    # the ramp runs during decoding: layers stop mid-generation (positions 82 and 84)
    "skipdecode": lambda: SkipDecode(count=2, start_position=PROMPT, ramp_tokens=4),
    "adaskip": lambda: AdaSkip(0.25),
}

def cases(methods, kvs=KV, arch: str | None = None) -> list:
    out = []
    for m in methods:
        for kv in kvs:
            args, name = ((m, kv), f"{m}-{kv}") if arch is None else ((arch, m, kv), f"{arch}-{m}-{kv}")
            out.append(pytest.param(*args, id=name))
    return out


def twin(arch: str = "llama"):
    return make_tiny(arch, num_hidden_layers=LAYERS)


def generate(model, x, **kw):
    return model.generate(x, max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)


def same_generation(a, b) -> bool:
    return torch.equal(a.sequences, b.sequences) and all(torch.equal(s, t) for s, t in zip(a.scores, b.scores, strict=True))


@pytest.mark.parametrize(
    ("arch", "method", "kv"),
    # Gemma 3 (sliding and full attention layers): one static, one scheduled and one sublayer method
    cases(METHODS, arch="llama") + cases(["shortgpt", "skipdecode", "attn_drop"], arch="gemma3"),
)
def test_generates_with_w4a8_and_kv_then_restores_exactly(arch, method, kv):
    m, fresh = twin(arch), twin(arch)
    x = ids(PROMPT).unsqueeze(0)
    modules = list(m.modules())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    t = METHODS[method]()
    ix.optimize(m, kv, t, quant())  # given out of order: stages sort them
    out = generate(m, x)
    assert out.sequences.shape == (1, PROMPT + NEW)
    assert all(torch.isfinite(s).all() for s in out.scores)

    assert ix.restore(m).complete
    assert list(m.modules()) == modules  # the very same module objects, in the same places
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items()) and m.state_dict().keys() == state.keys()
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert "generate" not in m.__dict__
    assert same_generation(generate(m, x), generate(fresh, x))


def static_plan(method: str, model) -> SkipPlan:
    """The plan ``method`` applies to ``model`` (SkipDecode with no ramp skips its layers everywhere)."""
    if method == "skipdecode":
        return SkipDecode(count=2, ramp_tokens=0).plan(model)
    return METHODS[method]().plan(model)


@pytest.mark.parametrize(("method", "kv"), cases(["uniform", "shortgpt", "attn_drop", "skipdecode"]))
def test_equals_plan_entered_by_hand_on_quantized_model_with_kv(method, kv):
    """optimize(skip, W4A8, kv) generates exactly what W4A8 + kv generates with the plan entered by hand."""
    a, b = twin(), twin()
    x = ids(PROMPT).unsqueeze(0)
    t = SkipDecode(count=2, ramp_tokens=0) if method == "skipdecode" else METHODS[method]()
    ix.optimize(a, quant(), t, kv)
    ix.optimize(b, quant(), kv)
    plan = static_plan(method, b)  # calibrated on the quantized twin, as `t` was on `a`
    assert plan == t.plan(a) and len(plan) == 2  # `a` keeps the similarities `t` measured when applied
    with plan.active(b):
        ref = generate(b, x)
    assert same_generation(generate(a, x), ref)


@torch.no_grad()
def greedy(model, x: torch.Tensor, steps: int, decode_plan: SkipPlan | None = None) -> list[torch.Tensor]:
    """Logits of a greedy loop over a cache from the model's KV-cache transform, ``decode_plan`` after prefill."""
    cache = new_cache(model)
    logits = [model(input_ids=x, cache=cache, use_cache=True).logits[:, -1]]
    with skipping(model, decode_plan):
        for _ in range(steps - 1):
            nxt = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1])
    return logits


@pytest.mark.parametrize("kv", KV)
def test_adaskip_equals_its_plan_entered_after_prefill(kv):
    """AdaSkip on W4A8 + kv: the full prefill, then decoding with the plan it chose, on a twin by hand."""
    a, b = twin(), twin()
    x = ids(PROMPT).unsqueeze(0)
    t = AdaSkip(0.25)
    # both on the module path: `b`'s plan, entered by hand, would put its steps there anyway
    ix.optimize(a, quant(), t, kv, "engine(enabled=false)")
    ix.optimize(b, quant(), kv, "engine(enabled=false)")
    got = greedy(a, x, NEW)
    plan = ix.skip.skip_state(a).controller.plan
    assert len(plan) > 0 and ix.skip.skip_state(a).controller.prefills == 1
    ref = greedy(b, x, NEW, decode_plan=plan)
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    full = greedy(b, x, NEW)  # and the plan did change the decode steps
    assert torch.equal(got[0], full[0]) and not all(torch.equal(g, f) for g, f in zip(got[1:], full[1:], strict=True))


@pytest.mark.parametrize(("method", "kv"), cases(["uniform", "shortgpt", "attn_drop"]))
def test_dropped_attention_stores_no_kv_under_a_kv_transform(method, kv):
    """Per layer: a skipped attention holds 0 bytes, every other layer as many as without skipping."""
    a, b = twin(), twin()
    x = ids(PROMPT).unsqueeze(0)
    t = METHODS[method]()
    ix.optimize(a, quant(), t, kv)
    ix.optimize(b, quant(), kv)
    plan = t.plan(a)
    caches = []
    for model in (a, b):
        cache = new_cache(model)
        model.generate(x, cache=cache, max_new_tokens=NEW, do_sample=False)
        caches.append(cache)
    got = [layer.kv_bytes() for layer in caches[0].layers]
    ref = [layer.kv_bytes() for layer in caches[1].layers]
    dropped = {i for i in range(LAYERS) if plan.skips_attention(i)}
    assert len(dropped) == 2 and all(r > 0 for r in ref)
    assert got == [0 if i in dropped else r for i, r in enumerate(ref)]
    assert caches[0].kv_bytes() * LAYERS == caches[1].kv_bytes() * (LAYERS - len(dropped))
    if kv != "kivi:4":  # the policy did evict on the kept layers
        assert caches[1].kv_bytes() < caches[1].full_kv_bytes()


def test_describe_after_skipping_quantized_layers():
    """describe() reports every transform, W4A8's too, when a skip plan has taken some of its
    quantized linears out of the module tree (the report holds the modules, not their paths)."""
    m = twin()
    ix.optimize(m, quant(), UniformSkip(count=2), "snapkv:0.5")
    described = ix.describe(m).transforms
    assert [e["stage"] for e in described] == ["weights", "layers", "cache", "decoding"]  # and the engine
    assert described[1]["report"]["skipped"] == "2:layer, 5:layer"
    assert described[0]["report"]["layers"] == 7 * LAYERS and described[0]["report"]["bytes_after"] > 0


@pytest.mark.parametrize(
    "kv",
    [
        "snapkv:0.5",
        "streamingllm",
        "kivi:4",
    ],
)
def test_kv_transform_added_by_a_later_optimize_call(kv):
    """Skipping first, the KV-cache transform in a second optimize call: same generation as one call."""
    a, b = twin(), twin()
    x = ids(PROMPT).unsqueeze(0)
    ix.optimize(a, UniformSkip(count=2))
    ix.optimize(a, kv)
    ix.optimize(b, UniformSkip(count=2), kv)
    assert same_generation(generate(a, x), generate(b, x))
