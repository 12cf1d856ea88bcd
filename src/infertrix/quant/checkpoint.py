"""Saving and loading quantized models: ``model.save_pretrained(path)`` and ``load_quantized(path)``.

Quantized modules keep everything in plain buffers, so transformers' own ``save_pretrained`` writes
them to safetensors unchanged. The transform also records which modules it replaced (type and
shape arguments) in ``model.config.infertrix_quantization``, which ``save_pretrained`` writes into
``config.json``. :func:`load_quantized` rebuilds the architecture from the config, puts empty
quantized modules in those places and loads the tensors: the outputs are identical to the saved
model's, with no recalibration. A tied ``lm_head`` that was quantized is saved as its own buffers;
the embedding keeps its float weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.transform import Applied, ConfigError

CONFIG_KEY = "infertrix_quantization"
FORMAT = 1


def module_types() -> dict[str, type[nn.Module]]:
    """Quantized module classes by name (each has ``spec()`` and ``from_spec(dict)``)."""
    from .w4a8_linear import W4A8Linear

    types: dict[str, type[nn.Module]] = {"W4A8Linear": W4A8Linear}
    try:
        from .w4a16 import W4A16Linear

        types["W4A16Linear"] = W4A16Linear
    except ImportError:
        pass
    try:
        from .w8a8 import W8A8Linear

        types["W8A8Linear"] = W8A8Linear
    except ImportError:
        pass
    return types


def record(model: nn.Module, recipe: str, modules: dict[str, nn.Module]) -> None:
    """Write the quantization record into ``model.config`` (undone by :func:`erase`)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    spec = {"format": FORMAT, "recipe": recipe, "modules": {n: m.spec() for n, m in modules.items() if hasattr(m, "spec")}}
    setattr(config, CONFIG_KEY, spec)


def erase(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise ConfigError(f"{path} has no model.safetensors (or index); save it with model.save_pretrained(path)")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(path / f))
    return state


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after an infertrix quant transform, in eval mode.

    ``dtype`` defaults to the dtype recorded in the config. The returned model carries the
    transform in ``infertrix.describe`` (not undoable: the float weights are not in the file).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.api import _state
    from ..core.recipe import parse_recipe
    from .module_swap import set_submodule

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    spec: dict[str, Any] | None = getattr(config, CONFIG_KEY, None)
    if not spec:
        raise ConfigError(
            f"{path} is not an infertrix-quantized checkpoint (no '{CONFIG_KEY}' in config.json); "
            "load it with transformers' from_pretrained"
        )
    if spec.get("format") != FORMAT:
        raise ConfigError(f"{path}: quantization format {spec.get('format')} is not supported (expected {FORMAT})")
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    types = module_types()
    for name, mspec in spec["modules"].items():
        cls = types.get(mspec["type"])
        if cls is None:
            raise ConfigError(f"{path}: unknown quantized module type {mspec['type']!r} for {name}")
        set_submodule(model, name, cls.from_spec(mspec))
    state = _read_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(f"{path}: checkpoint does not match the recorded modules: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.eval()
    transforms = parse_recipe(spec["recipe"])
    st = _state(model, create=True)
    for t in transforms:
        st.applied.append(
            Applied(t, undo=None, irreversible_reason="loaded from a quantized checkpoint (no float weights)",
                    report=lambda: {"layers": len(spec["modules"]), "loaded_from": str(path)})
        )
    return model
