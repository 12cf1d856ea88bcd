"""Checkpoints through transformers' own save_pretrained / from_pretrained (the registered quantizer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import byte_tokenizer, make_tiny
from torch import nn
from transformers import AutoModelForCausalLM

import infertrix as ix
from infertrix.linear import SkinnyLinear
from infertrix.quant import (
    W4A8,
    W4A16,
    W8A8,
    W4A8Linear,
    W4A16Linear,
    W8A8Linear,
    load_quantized,
)
from infertrix.quant.hf_config import REFUSAL_MARKER, InfertrixConfig
from infertrix.skip import ApplySkipPlan, SkipEntry, SkipPlan


def calib(n=2, t=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (1, t), generator=g) for _ in range(n)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


KINDS = {
    "w4a8_head": (lambda: W4A8(group_size=32, quantize_lm_head=True), W4A8Linear),
    "w4a8_rotate_head": (lambda: W4A8(group_size=32, rotate=True, quantize_lm_head=True), W4A8Linear),
    "w4a8_rotate": (lambda: W4A8(group_size=-1, symmetric=True, rotate=True), W4A8Linear),
    "w4a8_gptq": (lambda: W4A8(group_size=32, gptq=True, calibration_ids=calib(), progress=False), W4A8Linear),
    "w8a8_smooth": (lambda: W8A8(calibration_ids=calib(), progress=False, quantize_lm_head=True), W8A8Linear),
    "w4a16_head": (lambda: W4A16(group_size=32, quantize_lm_head=True), W4A16Linear),
}


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("qwen2", False)], ids=["llama_tied", "qwen2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_from_pretrained_rebuilds_every_quantized_kind(tmp_path, kind, arch, tied):
    make, cls = KINDS[kind]
    model = make_tiny(arch, tie_word_embeddings=tied)
    ix.optimize(model, make())
    ids = torch.randint(3, 128, (2, 9))
    ref, ref_gen = logits(model, ids), greedy(model, ids)
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    kinds = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, (W4A8Linear, W8A8Linear, W4A16Linear))}
    assert kinds == {n: type(m) for n, m in model.named_modules() if isinstance(m, cls)} and kinds
    assert torch.equal(logits(loaded, ids), ref)
    assert torch.equal(greedy(loaded, ids), ref_gen)
    desc = ix.describe(loaded).transforms
    # the saved model's transforms, and what optimize adds by default (the engine), as on the saved model
    assert [t["name"] for t in desc] == [t["name"] for t in ix.describe(model).transforms] == [
        model._infertrix.applied[0].transform.name, "engine"]
    assert desc[1]["report"]["last_forward"] == "engine" and desc[1]["report"]["engine_forwards"] > 0
    assert desc[0]["params"] == ix.describe(model).transforms[0]["params"] and not desc[0]["reversible"]
    assert desc[0]["report"]["layers"] == len(kinds)


def test_restore_on_a_loaded_model_keeps_it_and_says_why(tmp_path):
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 128, (1, 7))
    ref = logits(loaded, ids)
    with pytest.warns(UserWarning, match="w4a8: loaded from an infertrix checkpoint"):
        rep = ix.restore(loaded)
    assert "w4a8" in rep.not_restored and not rep.complete
    assert torch.equal(logits(loaded, ids), ref)
    assert [t["name"] for t in ix.describe(loaded).transforms] == ["w4a8"]
    with pytest.raises(RuntimeError, match="cannot fully restore"):
        ix.restore(loaded, strict=True)


def test_loaded_model_saves_again_and_takes_runtime_transforms(tmp_path):
    model = make_tiny("qwen2")
    ix.optimize(model, W4A8(group_size=32, quantize_lm_head=False))  # a float lm_head for skinny_linear below
    ids = torch.randint(3, 128, (2, 8))
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert REFUSAL_MARKER in loaded.config.fusion_config  # put back: a second save stays self-describing
    loaded.save_pretrained(tmp_path / "b", max_shard_size="40KB")  # sharded this time
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert torch.equal(logits(again, ids), ref)
    ix.optimize(again, "skinny_linear")  # runtime transforms go on top of a loaded model
    assert [t["name"] for t in ix.describe(again).transforms] == ["w4a8", "skinny_linear", "engine"]


def _layer_kinds(model):
    return [(type(layer).__name__, type(getattr(layer, "self_attn", None)).__name__) for layer in model.model.layers]


@pytest.mark.parametrize("quant", [False, True], ids=["float", "w4a8"])
@pytest.mark.parametrize("how", ["uniform", "plan", "skipdecode"])
def test_skip_plans_are_saved_and_reapplied(tmp_path, how, quant):
    model = make_tiny("llama", num_hidden_layers=6)
    transforms = [W4A8(group_size=32)] if quant else []
    skip = {"uniform": "uniform_skip:0.2", "skipdecode": "skipdecode(fraction=0.4,ramp_tokens=6)",
            "plan": ApplySkipPlan(plan=SkipPlan([SkipEntry(3, "layer"), SkipEntry(4, "attention")]))}[how]
    ix.optimize(model, *transforms, skip)
    ids = torch.randint(3, 128, (2, 9))
    ref, ref_gen = logits(model, ids), greedy(model, ids, n=8)  # SkipDecode: past its ramp
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    kinds = _layer_kinds(loaded)
    assert kinds == _layer_kinds(model) and kinds != _layer_kinds(make_tiny("llama", num_hidden_layers=6))
    assert torch.equal(logits(loaded, ids), ref)
    assert torch.equal(greedy(loaded, ids, n=8), ref_gen)
    names = [t["name"] for t in ix.describe(loaded).transforms]
    assert names == (["w4a8"] if quant else []) + ["skipdecode" if how == "skipdecode" else "skip_plan", "engine"]


def test_restore_removes_the_record(tmp_path):
    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32, quantize_lm_head=True), "uniform_skip:0.25")
    assert isinstance(model.config.quantization_config, InfertrixConfig)
    ix.restore(model)
    assert not hasattr(model.config, "quantization_config") and not hasattr(model.config, "fusion_config")
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in raw and "fusion_config" not in raw


def test_record_replaces_only_a_gguf_quantization_config():
    model = make_tiny("llama")
    gguf = {"quant_method": "gguf"}  # what from_pretrained(gguf_file=...) leaves: the weights are float
    model.config.quantization_config = gguf
    ix.optimize(model, W4A8(group_size=32))
    assert isinstance(model.config.quantization_config, InfertrixConfig)
    assert "_replaced" not in model.config.to_dict()["quantization_config"]
    ix.restore(model)
    assert model.config.quantization_config is gguf
    model.config.quantization_config = {"quant_method": "bitsandbytes_4bit"}
    with pytest.raises(ix.ConfigError, match="bitsandbytes_4bit"):
        ix.optimize(model, W4A8(group_size=32))
    assert ix.describe(model).transforms == [] and type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_skinny_linear_saves_a_plain_float_checkpoint(tmp_path):
    model = make_tiny("llama")
    ids = torch.randint(3, 128, (2, 9))
    ref = logits(model, ids)  # the float model's, before the kernel swap
    ix.optimize(model, "skinny_linear")
    assert isinstance(model.lm_head, SkinnyLinear)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in raw and "fusion_config" not in raw
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is nn.Linear and torch.equal(logits(loaded, ids), ref)
    assert ix.describe(loaded).transforms == []


def test_without_infertrix_imported_transformers_refuses(tmp_path):
    model = make_tiny("llama", vocab_size=320)
    ids = torch.randint(3, 128, (1, 9))
    float_ref = logits(model, ids)
    ix.optimize(model, W4A8(group_size=32))
    model.save_pretrained(tmp_path / "quant")
    byte_tokenizer().save_pretrained(tmp_path / "quant")
    ix.restore(model)
    ix.optimize(model, "skinny_linear")
    model.save_pretrained(tmp_path / "skinny")
    torch.save({"ids": ids, "ref": float_ref}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, pipeline
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "quant")!r})
            print("LOADED")
        except Exception as exc:
            print("REFUSED", type(exc).__name__, exc)
        try:
            pipeline("text-generation", model={str(tmp_path / "quant")!r})
            print("PIPELINE LOADED")
        except Exception as exc:
            print("PIPELINE REFUSED", exc)
        r = torch.load({str(tmp_path / "ref.pt")!r})
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "skinny")!r})
        with torch.no_grad():
            print("SKINNY_EQUAL", torch.equal(m(input_ids=r["ids"]).logits, r["ref"]))
        print("IMPORTED", "infertrix" in sys.modules)
    """)
    # the reference was computed at this process's thread count: the same count keeps the float reductions equal
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    refused = next(line for line in lines if line.startswith("REFUSED"))
    assert "pip install infertrix" in refused and "import infertrix" in refused
    assert any(line.startswith("PIPELINE REFUSED") and "infertrix" in line for line in lines), out.stdout
    assert "SKINNY_EQUAL True" in lines and "IMPORTED False" in lines, out.stdout


def test_pipeline_loads_a_saved_folder(tmp_path):
    from transformers import pipeline

    model = make_tiny("llama", vocab_size=320)
    ix.optimize(model, W4A8(group_size=32))
    tok = byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ref = greedy(model, tok("ab cd", return_tensors="pt")["input_ids"])
    pipe = pipeline("text-generation", model=str(tmp_path))
    assert isinstance(pipe.model.model.layers[0].mlp.down_proj, W4A8Linear)
    out = pipe("ab cd", max_new_tokens=6, do_sample=False, return_full_text=True)[0]["generated_text"]
    assert out == tok.decode(ref[0], skip_special_tokens=True)


def test_load_quantized_is_an_alias_with_clear_errors(tmp_path):
    with pytest.raises(ix.ConfigError, match="is not a folder"):
        load_quantized(tmp_path / "nowhere")
    with pytest.raises(ix.ConfigError, match="has no config.json"):
        load_quantized(tmp_path)
    model = make_tiny("llama")
    ix.optimize(model, W8A8(smooth_alpha=None))
    ids = torch.randint(3, 128, (1, 5))
    ref = logits(model, ids)
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(load_quantized(tmp_path / "q"), ids), ref)


def test_tampered_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny("llama")
    ix.optimize(model, W4A8(group_size=32))
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.up_proj.scale"]
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ix.ConfigError, match="missing .*model.layers.1.mlp.up_proj.scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_quantizing_on_load_is_refused_with_the_fix(tmp_path):
    make_tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ix.ConfigError, match="infertrix.optimize"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=InfertrixConfig())


def test_float_checkpoint_loads_untouched_with_infertrix_imported(tmp_path):
    model = make_tiny("qwen2")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded, "hf_quantizer", None) is None and ix.describe(loaded).transforms == []
    ids = torch.randint(3, 128, (1, 5))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize(
    "imports",
    [
        "import infertrix; from transformers import AutoModelForCausalLM",
        "from transformers import AutoModelForCausalLM; import infertrix",
        "import transformers.quantizers.auto; import infertrix",
        # a submodule first: infertrix.quant imports the quantizer module, which imports transformers'
        # registry, whose import hook then finds that module half-imported (it registers when done)
        "import torch; from infertrix.quant.transform import QuantTransform; import transformers",
    ],
)
def test_quantizer_is_registered_whatever_the_import_order(imports):
    code = (
        f"import warnings; warnings.simplefilter('always')\n{imports}\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "assert 'infertrix' in AUTO_QUANTIZER_MAPPING and 'infertrix' in AUTO_QUANTIZATION_CONFIG_MAPPING\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "could not register" not in res.stderr
