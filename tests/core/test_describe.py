"""describe(): one unit for bytes in the text, changed fields only, and every tensor the model
keeps alive (float layers kept for restore, a quantized draft, skipped layers) counted."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import Applied, Stage, Transform
from infertrix.core.model import decoder_layers, tensor_bytes
from infertrix.quant import W4A16
from infertrix.skip import SkipPlan
from infertrix.speculative import QuantizedSelf

MIB = re.compile(r"(\d+(?:\.\d+)?) MiB")


@ix.register_transform("_test_reports_bytes")
@dataclass
class ReportsBytes(Transform):
    stage = Stage.LAYERS
    size: int = 3 * 2**20 + 5

    def apply(self, model):
        report = {"kv_bytes": self.size, "stats": {"bytes_read": 2**20, "hits": 7}, "layers": 5, "note": "x"}
        return Applied(self, undo=lambda: None, report=lambda: report)


def _two_decimals_everywhere(text: str) -> None:
    found = MIB.findall(text)
    assert found and all(re.fullmatch(r"\d+\.\d\d", n) for n in found), found


def test_text_shows_every_byte_count_in_mib_with_two_decimals_and_data_stays_in_bytes():
    m = make_tiny("llama")
    ix.optimize(m, W4A16(group_size=32, progress=False), ReportsBytes())
    d = ix.describe(m)
    text = str(d)
    _two_decimals_everywhere(text)
    assert f"kv_bytes: {(3 * 2**20 + 5) / 2**20:.2f} MiB" in text and "bytes_read: 1.00 MiB" in text
    assert "hits: 7" in text and "layers: 5" in text  # counts that are not bytes stay counts
    quant = d.transforms[0]["report"]
    assert isinstance(quant["bytes_after"], int) and f"bytes_after: {quant['bytes_after'] / 2**20:.2f} MiB" in text
    data = d.to_dict()
    assert data["transforms"][1]["report"]["kv_bytes"] == 3 * 2**20 + 5
    assert isinstance(data["bytes_now"], int) and isinstance(data["bytes_held"], int)


def test_text_lists_only_the_fields_that_differ_from_the_defaults():
    m = make_tiny("llama")
    ix.optimize(m, "pld:4(adaptive=false),_test_reports_bytes")
    d = ix.describe(m)
    pld = next(t for t in d.transforms if t["name"] == "prompt_lookup")
    assert pld["changed_params"] == {"num_tokens": 4, "adaptive": False}
    assert pld["params"]["max_ngram"] == 4  # the data keeps every field
    text = str(d)
    assert "prompt_lookup(num_tokens=4, adaptive=False)" in text and "max_ngram" not in text
    assert "_test_reports_bytes()" in text


def test_float_layers_kept_for_restore_are_counted():
    kept, freed = make_tiny("llama"), make_tiny("llama")
    linear_bytes = sum(
        t.numel() * t.element_size()
        for layer in decoder_layers(kept) for mod in layer.modules() if isinstance(mod, torch.nn.Linear)
        for t in mod.parameters()
    )
    ix.optimize(kept, W4A16(group_size=32, progress=False))
    ix.optimize(freed, W4A16(group_size=32, progress=False, keep_original=False))
    dk, df = ix.describe(kept), ix.describe(freed)
    assert dk.bytes_held == dk.transforms[0]["held_bytes"] == linear_bytes
    assert dk.bytes_now == tensor_bytes(kept) + linear_bytes
    assert df.bytes_held == 0 and df.bytes_now == tensor_bytes(freed) < dk.bytes_now
    assert "held outside the model" in str(dk) and "held outside" not in str(df)
    ix.restore(kept)
    assert ix.describe(kept).bytes_now == dk.bytes_before


def test_quantized_self_draft_weights_are_counted():
    m = make_tiny("llama")
    t = QuantizedSelf(weight_bits=8)
    ix.optimize(m, t)
    d = ix.describe(m)
    draft_bytes = d.transforms[0]["report"]["draft_bytes"]
    own = tensor_bytes(m)
    assert draft_bytes > 0 and d.bytes_held == draft_bytes  # embeddings and norms are shared, not counted twice
    assert d.bytes_now == own + draft_bytes and d.bytes_before == own
    _two_decimals_everywhere(str(d))


def test_skipped_layers_kept_for_restore_are_counted():
    m = make_tiny("llama")
    layer_bytes = tensor_bytes(decoder_layers(m)[2])
    ix.optimize(m, ix.skip.ApplySkipPlan(plan=SkipPlan.of(layers=[2])))
    d = ix.describe(m)
    assert d.bytes_held == layer_bytes and d.bytes_now == d.bytes_before
