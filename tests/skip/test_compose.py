"""Skip transforms composed with weight and cache-stage transforms through ``optimize``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import make_tiny
from transformers import DynamicCache

import infertrix as ix
from infertrix.core import Applied, Stage, Transform
from infertrix.core.generation import add_generate_hook
from infertrix.core.model import decoder_layers
from infertrix.skip import AdaSkip, ShortGPT, SkipDecode, SkippedLayer, UniformSkip

CACHES: list[DynamicCache] = []


class FakeQuantLinear(torch.nn.Module):
    """A stand-in for a quantized linear: a module swap holding rounded weights."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("w", (lin.weight * 16).round() / 16)

    def forward(self, x):
        return x @ self.w.T


@ix.register_transform("_test_fake_quant")
@dataclass
class FakeQuant(Transform):
    stage = Stage.WEIGHTS

    def apply(self, model):
        swapped = []
        for layer in decoder_layers(model):
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, FakeQuantLinear(child))
                        swapped.append((parent, name, child))

        def undo():
            for parent, name, child in reversed(swapped):
                setattr(parent, name, child)

        return Applied(self, undo=undo, report=lambda: {"swapped": len(swapped)})


@ix.register_transform("_test_fresh_cache")
@dataclass
class FreshCache(Transform):
    """A stand-in cache policy: generate gets a cache built here when the caller passes none."""

    stage = Stage.CACHE
    conflict_group = "kv cache policy"

    def apply(self, model):
        def hook(m, args, kwargs):
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = DynamicCache(config=m.config)
                CACHES.append(kwargs["past_key_values"])
            return args, kwargs

        return Applied(self, undo=add_generate_hook(model, hook, int(self.stage)))


def calib(n=64):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "make",
    [
        lambda: UniformSkip(0.25),
        lambda: ShortGPT(0.25, calibration_ids=calib(), progress=False),
        lambda: SkipDecode(0.25, ramp_tokens=4),
        lambda: AdaSkip(0.25),
    ],
    ids=["uniform", "shortgpt", "skipdecode", "adaskip"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_layers_cache_stages_compose_and_restore(make, arch):
    m = make_tiny(arch, num_hidden_layers=8)
    x = calib(10).unsqueeze(0)
    ref_logits = m(x).logits
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    CACHES.clear()
    t = make()
    ix.optimize(m, "_test_fresh_cache", t, FakeQuant())  # given out of order: stages sort them
    names = [t["name"] for t in ix.describe(m).transforms]
    assert names[0] == "_test_fake_quant" and names[2] == "_test_fresh_cache"
    out = m.generate(x, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 16) and len(CACHES) == 1
    lengths = [layer.get_seq_length() if layer.is_initialized else 0 for layer in CACHES[0].layers]
    assert lengths[0] == 15
    if isinstance(t, AdaSkip):  # it may pick MLPs only: check its plan instead of the cache
        assert len(t.controller.plan) > 0 and t.controller.prefills == 1
    else:  # the cache of some skipped layer is shorter than layer 0's
        assert min(lengths) < 15
    rep = ix.restore(m)
    assert rep.complete
    assert m.state_dict().keys() == ref_state.keys()
    assert all(torch.equal(v, ref_state[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(x).logits, ref_logits)


def test_skip_on_quantized_model_equals_skip_of_quantized_model():
    """Skipping after a weight transform is the same as applying the plan to that model by hand."""
    a, b = make_tiny("mistral", num_hidden_layers=6), make_tiny("mistral", num_hidden_layers=6)
    ix.optimize(a, FakeQuant(), UniformSkip(count=2))
    ix.optimize(b, FakeQuant())
    plan = UniformSkip(count=2).plan(b)
    x = calib(12).unsqueeze(0)
    with plan.active(b):
        assert torch.equal(a(x).logits, b(x).logits)
    assert sum(isinstance(layer, SkippedLayer) for layer in decoder_layers(a)) == 2
