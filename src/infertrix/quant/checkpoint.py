"""Saving and loading optimized models with transformers' own ``save_pretrained`` / ``from_pretrained``.

    ix.optimize(model, "w4a8(rotate=true,quantize_lm_head=true),shortgpt:0.2")
    model.save_pretrained("m")                                    # safetensors + config.json
    model = AutoModelForCausalLM.from_pretrained("m")              # with `import infertrix` done
    model = infertrix.quant.load_quantized("m")                    # the same, with clearer errors

Quantized modules keep everything in plain buffers, so ``save_pretrained`` writes them to
safetensors unchanged. What the tensors alone do not say is recorded in ``model.config`` as it is
applied and written to ``config.json`` by ``save_pretrained``: ``quantization_config`` (an
:class:`~.hf_config.InfertrixConfig`, ``quant_method: "infertrix"``) holds the quantized
modules' specs (kind and constructor arguments, :meth:`~.linear_base.QuantizedLinear.spec`) and a
static skip plan, and a marker makes transformers refuse the folder when infertrix is not imported
(see :mod:`.hf_config`). Loading rebuilds each module from its kind in the registry of
:class:`~.linear_base.QuantizedLinear`, so a new kind needs no edit here.

What a checkpoint carries:
  - weight quantization (W4A8, W4A16, W8A8; GPTQ and round-to-nearest share the format, an
    optional quantized ``lm_head``): rebuilt from the tensors, identical outputs, no recalibration;
  - transforms folded into the weights (rotation, SmoothQuant smoothing): the tensors themselves;
    a rotated or head-quantized model saves ``tie_word_embeddings=False`` (its head is its own copy);
  - static skip plans (``skip_plan``, ``uniform_skip``, ``shortgpt``, ``attention_drop``...): the
    plan, re-applied at load (the skipped layers' weights are not in the file); SkipDecode: its
    schedule, the layers wrapped again before their weights load.
Not carried (runtime choices, applied again after loading): ``skinny_linear`` (a float kernel: its
layers save as plain float ``nn.Linear`` weights, so a skinny-only model saves as a plain float
checkpoint), KV-cache policies, speculative decoding, AdaSkip. A loaded model's transforms show in
``infertrix.describe`` and cannot be undone by ``restore`` (the float weights are not in the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.state import state
from ..core.transform import Applied, ConfigError
from ..linear.swap import output_projection_name, set_submodule
from .hf_config import FORMAT, QUANT_METHOD, InfertrixConfig, add_marker, remove_marker
from .linear_base import QuantizedLinear

LOADED = "loaded from an infertrix checkpoint (the float weights are not in it)"


# --- the live record on an optimized model ----------------------------------------------------
def _record(model: nn.Module, create: bool) -> InfertrixConfig | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    cfg = getattr(config, "quantization_config", None)
    if isinstance(cfg, InfertrixConfig):
        return cfg
    if not create:
        return None
    replaced = cfg
    if cfg is not None and _method(cfg) != "gguf":  # transformers de-quantizes GGUF files to float on load
        raise ConfigError(
            f"this model already carries a transformers quantization_config ({_method(cfg)}); infertrix cannot "
            "record its own into it: load the float model without that quantization"
        )
    cfg = InfertrixConfig()
    cfg._replaced = replaced  # put back by erase
    config.quantization_config = cfg
    add_marker(config)
    return cfg


def _method(cfg: Any) -> str:
    return str(cfg.get("quant_method") if isinstance(cfg, dict) else getattr(cfg, "quant_method", cfg))


def record(model: nn.Module, recipe: str, modules: dict[str, nn.Module]) -> None:
    """Record a weight transform's quantized modules in ``model.config`` (undone by :func:`erase`)."""
    cfg = _record(model, create=True)
    if cfg is not None:
        cfg.quant = {"recipe": recipe,
                     "modules": {n: m.spec() for n, m in modules.items() if isinstance(m, QuantizedLinear)}}


def record_skip(model: nn.Module, recipe: str, plan: Any, schedule: list[tuple[int, int]] | None = None) -> None:
    """Record a skip plan (or SkipDecode's ``schedule`` of (layer, first skipped position)) in
    ``model.config``, to re-apply at load (undone by ``erase(model, "skip")``)."""
    cfg = _record(model, create=True)
    if cfg is not None:
        cfg.skip = {"recipe": recipe, "plan": plan.to_dict(),
                    "schedule": [list(x) for x in schedule] if schedule is not None else None}


def erase(model: nn.Module, part: str = "quant") -> None:
    """Drop one part (``"quant"``, ``"skip"``) of the record; the whole record when nothing is left."""
    cfg = _record(model, create=False)
    if cfg is None:
        return
    setattr(cfg, part, None)
    if cfg.empty:
        replaced = getattr(cfg, "_replaced", None)
        if replaced is not None:
            model.config.quantization_config = replaced
        else:
            del model.config.quantization_config
        remove_marker(model.config)


# --- loading (called by the quantizer in from_pretrained) --------------------------------------
def rebuild(model: nn.Module, cfg: InfertrixConfig) -> None:
    """Put the recorded modules into the (meta, empty) ``model`` and apply the skip plan, before loading."""
    if cfg.quant:
        for name, spec in cfg.quant["modules"].items():
            cls = QuantizedLinear.lookup(spec.get("type"))
            if cls is None:
                raise ConfigError(f"unknown quantized module type {spec.get('type')!r} for {name} (known: "
                                  f"{', '.join(sorted(QuantizedLinear.kinds()))}); load this checkpoint with the "
                                  "infertrix version that saved it, or import the module that defines that kind")
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"the checkpoint records a quantized module {name} that "
                                  f"{type(model).__name__} does not have") from None
            set_submodule(model, name, cls.from_spec(spec))
    if cfg.skip and cfg.skip.get("schedule"):
        from ..core.model import decoder_layers
        from ..skip.skipdecode import ScheduledLayer

        layers = decoder_layers(model)
        for i, threshold in cfg.skip["schedule"]:
            layers[i] = ScheduledLayer(layers[i], threshold)
    elif cfg.skip:
        from ..skip.plan import SkipPlan

        SkipPlan.from_dict(cfg.skip["plan"]).apply(model)


def _quantized(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def check_checkpoint_keys(model: nn.Module, files: list[str]) -> None:
    """Raise unless every tensor of the rebuilt quantized modules is in the checkpoint files
    (transformers would otherwise leave a missing one uninitialised and only log it)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                keys.update(fh.keys())
    if not keys:
        return
    missing = [f"{n}.{b}" for n, m in _quantized(model).items() for b, t in m.named_buffers(recurse=False)
               if t is not None and f"{n}.{b}" not in keys]
    if missing:
        raise ConfigError(f"the checkpoint does not match its recorded quantized modules: missing {missing[:5]}; "
                          "it was changed after saving, save it again from the optimized model")


def attach_loaded(model: nn.Module, cfg: InfertrixConfig, source: str) -> None:
    """Check the loaded tensors, record the checkpoint's transforms for ``describe`` (irreversible)
    and add ``optimize``'s defaults (the decode engine), as on the model that was saved."""
    from .. import ops
    from ..core.recipe import parse_recipe

    quantized = _quantized(model)
    for name, mod in quantized.items():
        mod.check_loaded(name)
    st = state(model, create=True)
    if cfg.quant:
        transform = parse_recipe(cfg.quant["recipe"])[0]
        head = output_projection_name(model)
        kernel_op = getattr(transform, "kernel_op", "")

        def quant_report() -> dict[str, Any]:
            return {
                "layers": len(quantized),
                "lm_head": "quantized" if head in quantized else "float",
                "bytes_after": sum(m.storage_bytes() for m in quantized.values()),
                "kernel": f"{kernel_op}: {ops.status()[kernel_op]['cpu']}" if kernel_op else "torch",
                "loaded_from": source,
            }

        st.applied.append(Applied(transform, undo=None, irreversible_reason=LOADED, report=quant_report))
    if cfg.skip:
        from ..skip.apply_plan import ApplySkipPlan
        from ..skip.plan import SkipPlan
        from ..skip.strategy import plan_report

        plan = SkipPlan.from_dict(cfg.skip["plan"])
        schedule = cfg.skip.get("schedule")
        # SkipDecode is rebuilt from its recipe; a static plan is shown as the plan, the recipe beside it
        skip = parse_recipe(cfg.skip["recipe"])[0] if schedule else ApplySkipPlan(plan=plan)
        extra = {"first_skipped_position": dict(schedule)} if schedule else {"recipe": cfg.skip["recipe"]}
        st.applied.append(Applied(
            skip, undo=None, irreversible_reason=LOADED,
            report=lambda: {**plan_report(model, plan), **extra, "loaded_from": source},
        ))
    # what optimize adds by default (the decode engine) is not in the checkpoint: a saved model runs
    # as it did before saving, and describe() says why where a default is not added
    from ..core.api import optimize

    optimize(model)


def load_quantized(path: str | Path, dtype: torch.dtype | str | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after infertrix transforms (in eval mode).

    The same as ``AutoModelForCausalLM.from_pretrained(path)`` with infertrix imported, after
    checking that ``path`` is a folder holding an infertrix checkpoint (transformers takes a
    missing folder for a hub repository id and says so in other words). ``dtype`` defaults to the
    saved one; ``kwargs`` go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder; give the folder model.save_pretrained(path) wrote")
    if not config_file.is_file():
        raise ConfigError(f"{path} has no config.json; give the folder model.save_pretrained(path) wrote")
    raw = json.loads(config_file.read_text())
    qc = raw.get("quantization_config")
    if "infertrix_quantization" in raw:
        raise ConfigError(f"{path} was saved by an older infertrix (format 1); quantize the float model again "
                          "and save it with this version")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ConfigError(
            f"{path} is not an infertrix-quantized checkpoint (no quantization_config with quant_method "
            f"'{QUANT_METHOD}' in config.json); load it with transformers' from_pretrained"
        )
    if qc.get("format") != FORMAT:
        raise ConfigError(f"{path}: infertrix checkpoint format {qc.get('format')} is not supported "
                          f"(expected {FORMAT}); load it with the infertrix version that saved it")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto", **kwargs)
