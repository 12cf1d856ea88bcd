"""``infertrix.export``: write a quantized model as a checkpoint other engines load.

    ix.optimize(model, "w8a8")                 # or w4a16 / w4a8, after GPTQ, SmoothQuant, rotation
    ix.export(model, "out", format="compressed-tensors")
    AutoModelForCausalLM.from_pretrained("out")    # transformers' compressed-tensors integration
    vllm.LLM("out")                                 # vLLM reads the same folder

What is carried: the quantized layers (see :mod:`.compressed_tensors` for each kind and what is
converted), every other tensor as it is, which includes what rotation and SmoothQuant folded into
the weights and norms (both change only tensors, so they need nothing at run time), and the config
(a rotated or head-quantized model is written untied). What is refused, by name: every transform
that is run-time behaviour rather than weights (KV-cache policies, skip plans, speculative
decoding, float kernels such as ``skinny_linear``), SqueezeLLM outliers, kinds the format has no
scheme for. Needs the ``compressed-tensors`` package (``pip install infertrix[export]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.state import state
from ..core.transform import ConfigError
from ..linear.swap import output_projection_name
from .compressed_tensors import Converted, convert
from .hf_config import REFUSAL_MARKER, InfertrixConfig
from .linear_base import QuantizedLinear
from .transform import QuantTransform

FORMATS = ("compressed-tensors",)


def _refuse_runtime_transforms(model: nn.Module) -> None:
    st = state(model)
    others = [a.transform.name for a in (st.applied if st else [])
              if not isinstance(a.transform, QuantTransform) and not a.transform.same_weights]
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, InfertrixConfig) and cfg.skip:
        others.append(f"skip plan {cfg.skip.get('recipe')}")
    if others:
        raise ConfigError(
            f"compressed-tensors carries weight quantization only, not {', '.join(others)} (run-time behaviour "
            "the format and vLLM have no place for); export a model optimized with the quant transform alone "
            "and apply the others where it runs"
        )


def export(model: nn.Module, folder: str | Path, format: str = "compressed-tensors") -> dict[str, Any]:
    """Write ``model`` (optimized with W8A8, W4A16 or W4A8) to ``folder`` in ``format``.

    Returns a summary: the format, the quantized layers per scheme, and which layers are not
    bit-exact copies of our dequantized weights (see :mod:`.compressed_tensors`). Raises
    :class:`ConfigError` for what the format cannot carry.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    except ImportError:
        raise ConfigError("exporting to compressed-tensors needs its package: pip install 'infertrix[export]' "
                          "(or pip install compressed-tensors)") from None
    from safetensors.torch import save_file

    _refuse_runtime_transforms(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not quantized:
        raise ConfigError("the model has no quantized layers; optimize it with w8a8, w4a16 or w4a8 before exporting")
    converted: dict[str, Converted] = {n: convert(m, n) for n, m in quantized.items()}

    groups: list[tuple[dict[str, Any], str, list[str]]] = []  # (scheme, format, module names)
    for name, c in converted.items():
        for scheme, fmt, names in groups:
            if scheme == c.scheme and fmt == c.format:
                names.append(name)
                break
        else:
            groups.append((c.scheme, c.format, [name]))
    floats = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if len(groups) == 1:  # llm-compressor's shape: the class as target, float layers ignored
        config_groups = {"group_0": QuantizationScheme(targets=["Linear"], format=groups[0][1], **groups[0][0])}
        ignore = floats
    else:
        config_groups = {f"group_{i}": QuantizationScheme(targets=names, format=fmt, **scheme)
                         for i, (scheme, fmt, names) in enumerate(groups)}
        ignore = []
    formats = {fmt for _, fmt, _ in groups}
    qconfig = QuantizationConfig(config_groups=config_groups, format=formats.pop() if len(formats) == 1
                                 else "mixed-precision", quantization_status="compressed", ignore=ignore)

    tensors = _state_tensors(model, quantized)
    for name, c in converted.items():
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in c.tensors.items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_config(model, folder, {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
        "sparsity_config": {}, "transform_config": {}, **qconfig.model_dump(exclude={"quant_method"}),
    })
    return {
        "format": format,
        "schemes": {f"{fmt} {json.dumps(s, sort_keys=True)}": len(names) for s, fmt, names in groups},
        "not_bit_exact": sorted(n for n, c in converted.items() if not c.exact),
        "float_linear_layers": floats,
    }


def _state_tensors(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` outside the quantized modules, as the checkpoint keys name them;
    a tied output projection is left out (the config says it is tied)."""
    head = output_projection_name(model) if getattr(model.config, "tie_word_embeddings", False) else None
    prefixes = tuple(f"{n}." for n in quantized)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key.startswith(prefixes) or t is None:
            continue
        if head is not None and key == f"{head}.weight":
            continue
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.detach().clone() if ptr in seen else t.detach().contiguous()  # safetensors refuses shared storage
        seen.add(ptr)
    return out


def _write_config(model: nn.Module, folder: Path, quantization_config: dict[str, Any]) -> None:
    config = model.config
    data = config.to_dict()
    data.pop("quantization_config", None)
    fusions = {k: v for k, v in (data.pop("fusion_config", None) or {}).items() if k != REFUSAL_MARKER}
    if fusions:  # infertrix's refusal marker belongs to its own format only
        data["fusion_config"] = fusions
    data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
