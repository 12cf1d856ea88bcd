"""Defaults of the quant transforms (a change must be deliberate: BENCHMARKS.md `quant-defaults`
measured them), and calibration from a recipe string, which cannot pass a tokenizer object."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import calibration as calibration_mod
from infertrix.core.recipe import parse_recipe
from infertrix.quant import W4A8, W8A8, W8A8Linear

W4A8_DEFAULTS = dict(
    group_size=32, symmetric=False, mse_clip=True, rotate="auto", quantize_lm_head=True,
    gptq=False, act_order=True, smooth_alpha=None, calibration_windows=8, window_tokens=256, damp=0.01,
    outlier_fraction=0.0, keep_original=True, progress=True,
)


def fields(t) -> dict:
    return {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}


def test_w4a8_defaults_are_the_measured_ones():
    got = fields(W4A8())
    assert {k: got[k] for k in W4A8_DEFAULTS} == W4A8_DEFAULTS
    (from_recipe,) = parse_recipe("w4a8")
    assert fields(from_recipe) == got
    (calibrated,) = parse_recipe("w4a8(gptq=true)")  # the one-minute calibrated setting
    assert calibrated.gptq and calibrated.act_order and calibrated.mse_clip and calibrated.rotate == "auto"


def test_w8a8_defaults():
    got = fields(W8A8())
    assert (got["smooth_alpha"], got["gptq"], got["rotate"], got["quantize_lm_head"]) == (0.5, False, False, False)


def calib(n=4, t=32):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


def rotation_report(model, transform) -> str:
    ix.optimize(model, transform)
    report = ix.describe(model).transforms[0]["report"]
    assert ("rotated" in report["calibration"]) == report["rotation"].startswith("residual stream rotated")
    return report["rotation"]


def test_rotate_auto_rotates_only_with_gptq_where_supported_and_says_so():
    assert rotation_report(make_tiny("llama"), W4A8()).startswith("off (rotate='auto' rotates only with gptq")
    gptq = dict(gptq=True, calibration_ids=calib(), progress=False)
    assert rotation_report(make_tiny("llama"), W4A8(**gptq)).startswith("residual stream rotated")
    gemma = make_tiny("gemma3")  # its (1 + weight) norms cannot be rotated: quantized unrotated
    why = rotation_report(gemma, W4A8(**gptq))
    assert why.startswith("skipped (rotate='auto')") and "Gemma" in why
    assert torch.isfinite(gemma(input_ids=torch.randint(3, 128, (1, 9))).logits).all()
    with pytest.raises(ix.ConfigError, match="rotate must be"):
        W4A8(rotate="yes")


def word_tokenizer(words: int = 125):
    """A real (fast) tokenizer whose ids fit the tiny models' vocabulary of 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    common = ["the", "of", "and", "to", "a", "in", "was", "her", "i", "it", "he", "that", "she", "not", "be",
              "his", "you", "had", "as", "with", "for", "but", "is", "have", "at", "mr", "him", "on", "my", "by"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(common[:words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


RECIPE = "w8a8(calibration_windows=2, window_tokens=32)"  # SmoothQuant: calibrates on text


def test_w8a8_recipe_finds_the_tokenizer_in_the_models_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    make_tiny("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ix.optimize(model, RECIPE)
    assert isinstance(model.model.layers[0].mlp.down_proj, W8A8Linear)
    assert "smooth" in ix.describe(model).transforms[0]["report"]["calibration"]


def test_w8a8_recipe_uses_the_tokenizer_infertrix_models_load_returned(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model, tok = ix.models.load(str(tmp_path))
    for f in tmp_path.iterdir():  # the folder no longer has it: only the record can supply it
        if "token" in f.name:
            f.unlink()
    assert calibration_mod.find_tokenizer(model)[0] is tok
    ix.optimize(model, RECIPE)
    assert isinstance(model.model.layers[0].mlp.down_proj, W8A8Linear)


def test_find_tokenizer_reads_a_gguf_folder(tmp_path, monkeypatch):
    import transformers

    (tmp_path / "model.Q4_0.gguf").write_bytes(b"")
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        if "gguf_file" not in kwargs:
            raise OSError("no tokenizer.json")
        return "tok"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    model = make_tiny("llama")
    model.config._name_or_path = str(tmp_path)
    assert calibration_mod.find_tokenizer(model)[0] == "tok"
    assert calls == [{}, {"gguf_file": "model.Q4_0.gguf"}]


@pytest.mark.parametrize("recipe", [RECIPE, "w4a8(gptq=true, rotate=true)"])
def test_calibration_without_a_tokenizer_is_refused_at_optimize_time_with_the_fixes(recipe):
    model = make_tiny("llama")  # built from a config: no folder, no tokenizer anywhere
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = recipe.split("(")[0]
    no_data = "smooth_alpha=none" if name == "w8a8" else "gptq=false"
    with pytest.raises(ix.ConfigError, match="tokenizer") as err:
        ix.optimize(model, recipe)
    msg = str(err.value)
    assert "tokenizer=tok" in msg and "calibration_ids=" in msg and f"'{name}({no_data})'" in msg
    assert "no name_or_path" in msg
    assert not hasattr(model, "_infertrix") or not ix.describe(model).transforms
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
