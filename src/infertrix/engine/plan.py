"""Which models the engine runs, and the per-layer plan it runs them with.

Supported: decoder-only ``llama``, ``mistral``, ``qwen2`` and ``qwen3`` models (RMSNorm, rotary
attention with grouped heads, optional per-head query/key norms, optional sliding windows, a
SiLU-gated MLP) and Gemma 3 text models (``gemma3_text``: sliding and global layers with their own
rotary tables, Gemma's RMSNorm ``x * (1 + w)``, norms on the attention and MLP outputs, q/k norms,
``query_pre_attn_scalar`` scaling, the scaled embedding, a gelu_pytorch_tanh-gated MLP), and the
sparse-MoE ``mixtral``, ``qwen2_moe`` and ``qwen3_moe`` models, whose MoE blocks run between the
engine's ops (``moe.py``: on row-invariant kernels, or as the model's modules), in float32
whose linear layers are float32 ``nn.Linear``, ``W4A8Linear``, ``W8A8Linear``, ``W4A16Linear``
or FlattenQuant's ``FlattenLinear`` (``linears.kind``).
:func:`why_unsupported` names the first thing that is not. Both read the layers as they are
without the skip plans applied now (``skips.layer_views``): the engine skips what the plans skip
per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.model import llama_shape_problem, model_type, norm_eps, text_config
from . import linears
from .moe import RowMoE, is_moe_block, known_hooks, row_moe
from .skips import layer_views, view_fingerprint

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe")
_CONFIG_WINDOW = ("mistral", "mixtral")  # sliding window from the config (the others: per attention module)
GEMMA = "gemma3_text"
_LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm", "Qwen2MoeRMSNorm",
                "Qwen3MoeRMSNorm")
_GEMMA_NORMS = ("Gemma3RMSNorm",)  # weight * normalised x with weight = 1 + w
# a layer's norms besides q/k: Llama-style layers, and Gemma 3's with norms on the sublayer outputs
_LAYER_NORMS = {
    False: ("input_layernorm", "post_attention_layernorm"),
    True: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
}


def _norm_problem(norm: nn.Module | None, name: str) -> str | None:
    if norm is None or norm_eps(norm) is None or getattr(norm, "weight", None) is None:
        return f"{name} is not an RMSNorm with a weight"
    if norm.weight.dtype != torch.float32 or type(norm).__name__ not in _LLAMA_NORMS + _GEMMA_NORMS:
        return f"{name} is a {type(norm).__name__} (the engine runs the float32 Llama and Gemma 3 RMSNorms)"
    return None


def _gemma_problem(model: nn.Module) -> str | None:
    """Gemma 3 options the engine does not run (its attention has no softcap, its head no tanh)."""
    cfg = text_config(model)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is not None:
            return f"{name}={getattr(cfg, name)} (the engine does not softcap)"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "use_bidirectional_attention (the engine's attention is causal)"
    return None


def _layer_problem(i: int, layer: nn.Module, attn: nn.Module | None, mlp: nn.Module | None, gemma: bool) -> str | None:
    if attn is None or mlp is None:
        return f"layer {i} has no self_attn / mlp (another architecture, or a layer swapped outside infertrix.skip's plans)"
    names = {f"self_attn.{n}": getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if not is_moe_block(mlp):  # an MoE block runs as the model's module (moe.py)
        names |= {f"mlp.{n}": getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")}
    for name, mod in names.items():
        if mod is None:
            owner = attn if name.startswith("self_attn") else mlp
            return (f"layer {i} has no {name} (its {name.split('.')[0]} is a {type(owner).__name__}: MoE, another "
                    "architecture, or a module swapped outside infertrix.skip's plans)")
        if why := linears.why_not(mod, f"layer {i} {name}"):
            return why
    for name in _LAYER_NORMS[gemma]:
        if why := _norm_problem(getattr(layer, name, None), f"layer {i} {name}"):
            return why
    for name in ("q_norm", "k_norm"):
        if getattr(attn, name, None) is not None and (why := _norm_problem(getattr(attn, name), f"layer {i} {name}")):
            return why
    return None


def _placement_problem(model: nn.Module) -> str | None:
    """accelerate's dispatch replaces module forwards (weights brought in per call) and leaves meta
    tensors behind: the engine, which reads the weights itself, would read those."""
    for name, mod in model.named_modules():
        if hasattr(mod, "_hf_hook"):
            return f"{name or 'the model'} is dispatched by accelerate (device_map hooks move its weights per call)"
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            return f"{name} is on {p.device} (the engine runs models whose weights are all on the CPU)"
    return None


def why_unsupported(model: nn.Module) -> str | None:
    """None when the engine can run ``model``, else why not (shown by ``describe``)."""
    if why := llama_shape_problem(model, SUPPORTED, "the engine runs", ("silu", "swish", "gelu_pytorch_tanh")):
        return why
    gemma = model_type(model) == GEMMA
    if gemma and (why := _gemma_problem(model)):
        return why
    inner = model.model
    if why := _placement_problem(model):
        return why
    if inner.embed_tokens.weight.dtype != torch.float32:
        return f"{inner.embed_tokens.weight.dtype} weights (the engine runs float32 models)"
    for i, (layer, attn, mlp) in enumerate(layer_views(model)):
        if why := _layer_problem(i, layer, attn, mlp, gemma):
            return why
    if why := _norm_problem(inner.norm, "the final norm"):
        return why
    head = model.get_output_embeddings()
    if head is None:
        return "no lm_head"
    return linears.why_not(head, "lm_head")


@dataclass
class LayerPlan:
    """One decoder layer in ``infertrix::engine_layer``'s packed layout (``ops/engine.py``);
    ``rope``: which rotary tables it reads (Gemma 3's layer type, else None: the model's one)."""

    in_norm: Tensor
    in_eps: float
    tensors: list[Tensor | None]
    ints: list[int]
    floats: list[float]
    rope: str | None = None
    mlp: nn.Module | None = None  # an MoE block (moe.py); None: the MLP is packed
    layer_module: nn.Module | None = None  # the decoder layer and its post-attention norm, whose
    mid_module: nn.Module | None = None  # infertrix.moe hooks an MoE layer calls (moe.known_hooks)
    moe: RowMoE | None = None  # the MoE block on row-invariant kernels (moe.py), else None
    moe_why: str | None = None  # why an MoE block runs as the model's module

    def layer_hooks(self) -> list:
        return _known(self.layer_module, "_forward_hooks")

    def norm_hooks(self) -> list:
        return _known(self.mid_module, "_forward_pre_hooks")


def _known(module: nn.Module | None, kind: str) -> list:
    return [fn for fn in getattr(module, kind, {}).values() if known_hooks(fn)] if module is not None else []


def _norm(norm: nn.Module | None) -> tuple[Tensor, float] | None:
    """(weight, eps) in the engine's ``weight * normalised x`` form: Gemma's 1 + w (the same float32
    sum its forward computes each call) or the weight itself."""
    if norm is None:
        return None
    w = norm.weight.detach()
    return (1.0 + w.float() if type(norm).__name__ in _GEMMA_NORMS else w), norm_eps(norm)


def layer_plan(model: nn.Module, layer: nn.Module, attn: nn.Module, mlp: nn.Module,
               next_norm: tuple[Tensor, float]) -> LayerPlan:
    """Pack ``layer`` with its ``attn`` and ``mlp`` (``next_norm``: the following layer's input
    norm, or the final norm)."""
    cfg = text_config(model)
    gemma = model_type(model) == GEMMA
    if model_type(model) in _CONFIG_WINDOW:
        window = getattr(cfg, "sliding_window", None) or 0
    else:
        window = getattr(attn, "sliding_window", None) or 0
    qkv = linears.fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    group_qkv = [qkv] if qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    moe = is_moe_block(mlp)
    if moe:  # no MLP slots: the block runs as a module
        group_gu, mlp_slots = [], []
    else:
        gate_up = linears.fuse([mlp.gate_proj, mlp.up_proj])
        group_gu = [gate_up] if gate_up is not None else [mlp.gate_proj, mlp.up_proj]
        mlp_slots = [*group_gu, mlp.down_proj]
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qn, kn = _norm(getattr(attn, "q_norm", None)), _norm(getattr(attn, "k_norm", None))
    # Gemma 3: post_attention_layernorm normalises the attention output, pre_feedforward the MLP input
    mid = _norm(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm)
    attn_out = _norm(layer.post_attention_layernorm) if gemma else None
    mlp_out = _norm(layer.post_feedforward_layernorm) if gemma else None
    tensors = [mid[0], next_norm[0]] + [n[0] if n else None for n in (qn, kn, attn_out, mlp_out)]
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    ints = [heads, kv_heads, head_dim, len(group_qkv), len(group_gu), int(window), int(act == "gelu_pytorch_tanh")]
    for mod in [*group_qkv, attn.o_proj, *mlp_slots]:
        i, t = linears.slot(mod)
        ints += i
        tensors += t
    scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))
    floats = [scaling, mid[1], next_norm[1]] + [n[1] if n else 0.0 for n in (qn, kn, attn_out, mlp_out)]
    ln = _norm(layer.input_layernorm)
    rope = getattr(attn, "layer_type", None) if gemma else None
    if moe:
        row, why = row_moe(mlp)
        return LayerPlan(ln[0], ln[1], tensors, ints, floats, rope, mlp, layer, layer.post_attention_layernorm,
                         row, why)
    return LayerPlan(ln[0], ln[1], tensors, ints, floats, rope)


def fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Identities of the modules a plan reads: a plan is stale when any was swapped (other than by
    a skip plan, which the engine follows per forward)."""
    return view_fingerprint(model)
