"""Export to compressed-tensors and back through transformers' own compressed-tensors integration."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core.transform import ConfigError
from infertrix.quant.int4 import quantize_int4

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install 'infertrix[export]')")

from transformers import AutoModelForCausalLM  # noqa: E402

# Logits of transformers' decompressed model vs ours: same weights, different kernels (transformers
# fake-quantizes activations per token in float; our W4A16 kernel computes in bfloat16).
LOGIT_ATOL = 2e-2


def _roundtrip(recipe: str, tmp_path):
    model = make_tiny("llama", hidden_size=64, intermediate_size=128)
    float_model = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ix.optimize(model, recipe)
    summary = ix.export(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits  # the first forward decompresses
    return model, float_model, loaded, summary, ours, theirs


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ix.quant.QuantizedLinear)}


@pytest.mark.parametrize("recipe", ["w8a8(smooth_alpha=none)", "w4a8", "w4a8(symmetric=true,group_size=48)"])
def test_w8a8_and_w4a8_decompress_to_our_weights_bitwise(recipe, tmp_path):
    model, _, loaded, summary, ours, theirs = _roundtrip(recipe, tmp_path)
    assert summary["not_bit_exact"] == []
    for name, mod in _quantized(model).items():
        mine = mod.qweight.float() * mod.scale[:, None] if mod.kind == "w8a8" else mod.dequantize()
        assert torch.equal(loaded.get_submodule(name).weight, mine), name
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=0)


def test_w4a16_symmetric_decompresses_to_our_weights_bitwise(tmp_path):
    model, float_model, loaded, summary, ours, theirs = _roundtrip("w4a16(symmetric=true,group_size=32)", tmp_path)
    assert summary["not_bit_exact"] == []
    for name in _quantized(model):
        # recomputed from the float weight, independently of the export's reading of torch's int4pack layout
        w = quantize_int4(float_model.get_submodule(name).weight, 32, True, two_level=False)
        step = w.group_scale.to(torch.bfloat16).float().repeat_interleave(32, dim=1)  # the module keeps bf16 steps
        assert torch.equal(loaded.get_submodule(name).weight, (w.q.float() - 8) * step), name
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=0)


def _unpack_like_vllm_cpu(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight vLLM CPU's ``CPUWNA16LinearKernel`` reads from ``weight_packed`` [N, K/8] and
    ``weight_scale`` [N, G] (vllm 0.32.0): nibble i of word j is input column 8j + i, the code is
    offset by 8 (``uint4b8``), and the group of column k is k // (K / G)."""
    n, words = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    codes = ((packed[:, :, None] >> shifts) & 15).reshape(n, words * 8)
    return (codes.float() - 8) * scale.float().repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)


def test_w4a16_symmetric_packing_is_what_vllm_cpu_and_compressed_tensors_write(tmp_path):
    """Issue 18: vLLM CPU's W4A16 path reads our packing as intended (its default W4A8 path on AMX
    CPUs differs by its int8 activations, docs/scale.md); and compressed-tensors' own compressor,
    given our weight and scales, writes the same bytes."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = make_tiny("llama", hidden_size=64, intermediate_size=128)
    float_model = copy.deepcopy(model)
    ix.optimize(model, "w4a16(symmetric=true,group_size=32)")
    ix.export(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    scheme = QuantizationScheme(**json.loads((tmp_path / "config.json").read_text())
                                ["quantization_config"]["config_groups"]["group_0"])
    for name in _quantized(model):
        w = quantize_int4(float_model.get_submodule(name).weight, 32, True, two_level=False)
        expected = (w.q.float() - 8) * w.group_scale.to(torch.bfloat16).float().repeat_interleave(32, dim=1)
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert torch.equal(_unpack_like_vllm_cpu(packed, scale), expected), name
        theirs = PackedQuantizationCompressor.compress({"weight": expected, "weight_scale": scale}, scheme)
        assert torch.equal(theirs["weight_packed"], packed), name


def test_config_names_the_format_and_float_layers(tmp_path):
    model = make_tiny("llama", hidden_size=64, intermediate_size=128)
    ix.optimize(model, "w8a8(smooth_alpha=none)")
    ix.export(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "fusion_config" not in cfg  # infertrix's refusal marker is for its own format only


def test_refuses_what_the_format_cannot_carry(tmp_path):
    model = make_tiny("llama", hidden_size=64, intermediate_size=128)
    with pytest.raises(ConfigError, match="no quantized layers"):
        ix.export(model, tmp_path)
    ix.optimize(model, "w8a8(smooth_alpha=none),streamingllm")
    with pytest.raises(ConfigError, match="weight quantization only"):
        ix.export(model, tmp_path)
    outliers = make_tiny("llama", hidden_size=64, intermediate_size=128)
    ix.optimize(outliers, "w4a8(outlier_fraction=0.01)")
    with pytest.raises(ConfigError, match="outlier"):
        ix.export(outliers, tmp_path)
    with pytest.raises(ConfigError, match="unknown export format"):
        ix.export(outliers, tmp_path, format="gguf")
