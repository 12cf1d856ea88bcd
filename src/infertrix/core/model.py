"""What infertrix needs to know about a transformers causal LM, found in one place."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch import Tensor, nn

from .transform import UnsupportedModelError


def text_config(model: nn.Module):
    """The decoder's config (the text config of multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no .config; infertrix works on Hugging Face transformers models"
        )
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (``model.model.layers`` in transformers 5)."""
    inner = getattr(model, "model", None)
    for candidate in (inner, getattr(inner, "language_model", None), model):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}; infertrix supports decoder-only "
        "transformers models with a `model.layers` list (Llama, Qwen2/3, Mistral, Gemma, Mixtral...)"
    )


def require_causal_lm(model: nn.Module, what: str) -> None:
    """Raise UnsupportedModelError unless ``model`` is a decoder-only language model that can
    ``generate`` (what cache policies, decoding loops and draft models act through)."""
    can = getattr(model, "can_generate", None)
    generates = callable(getattr(type(model), "generate", None)) and (can() if callable(can) else True)
    config = getattr(model, "config", None)
    if generates and not getattr(config, "is_encoder_decoder", False):
        return
    reason = (
        "is an encoder-decoder model" if generates
        else "has no generate() (an encoder, or a base model without its causal language-model head)"
    )
    raise UnsupportedModelError(
        f"{what} works through model.generate of a decoder-only language model, and {type(model).__name__} "
        f"{reason}; load the model with AutoModelForCausalLM.from_pretrained (or infertrix.models.load)"
    )


def model_type(model: nn.Module) -> str:
    return getattr(text_config(model), "model_type", type(model).__name__)


def require_model_type(model: nn.Module, supported: tuple[str, ...], what: str) -> None:
    """Raise UnsupportedModelError unless the model's ``model_type`` is in ``supported``."""
    mt = model_type(model)
    if mt not in supported:
        raise UnsupportedModelError(
            f"{what} does not support model_type {mt!r}; supported: {', '.join(sorted(supported))}"
        )


def tensor_bytes(module: nn.Module, extra: Iterable[Tensor] = ()) -> int:
    """Bytes of the parameters and buffers of ``module`` and the tensors ``extra``, counting shared
    (tied) storage once."""
    seen, total = set(), 0
    for t in itertools.chain(module.parameters(), module.buffers(), extra):
        t = getattr(t, "_local_tensor", t)  # a tensor-parallel DTensor: this rank's shard is what it holds
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def norm_eps(norm: nn.Module | None) -> float | None:
    """An RMSNorm's epsilon (``variance_epsilon`` or ``eps``), or None when ``norm`` has none."""
    for name in ("variance_epsilon", "eps"):
        v = getattr(norm, name, None)
        if isinstance(v, float):
            return v
    return None


def llama_shape_problem(
    model: nn.Module, supported: tuple[str, ...], runner: str, activations: tuple[str, ...] = ("silu", "swish")
) -> str | None:
    """Why ``model`` is not a Llama-shaped decoder that ``runner`` (a hand-written forward: the
    decode engine, lean drafting) can run, as far as its config and top-level modules tell: model
    type, length-dependent rotary scaling (per layer type where the config has several, as Gemma 3
    does), an MLP activation outside ``activations``, embedding / final norm / rotary modules.
    None when nothing there rules it out; the caller then checks its layers."""
    try:
        mt = model_type(model)
        decoder_layers(model)
    except Exception as e:  # noqa: BLE001 - any failure to find the structure is "not supported"
        return str(e)
    if mt not in supported:
        return f"model type {mt!r} ({runner} {', '.join(supported)})"
    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    ropes = ([r for r in rope.values() if isinstance(r, dict)] or [rope]) if isinstance(rope, dict) else []
    for r in ropes:
        if r.get("rope_type", r.get("type")) in ("dynamic", "longrope"):
            return f"rotary scaling {r.get('rope_type', r.get('type'))!r} (its tables depend on the length)"
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if str(act) not in activations:
        return f"activation {act!r}"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(inner, name, None) is None:
            return f"no model.{name}"
    return None
