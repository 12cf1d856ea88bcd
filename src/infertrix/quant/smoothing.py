"""SmoothQuant smoothing (Xiao et al. 2023, https://arxiv.org/abs/2211.10438), folded into the model.

For a linear layer's input channel j, ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``; the layer
computes ``(X / s) (W s)^T``, identical in exact arithmetic, but activation outliers move into the
weights (alpha = migration strength). ``1 / s`` is folded into whatever produces X, so it costs
nothing at run time:

- the RMSNorm before q/k/v (``input_layernorm``) and before gate/up (``post_attention_layernorm``,
  or Gemma's ``pre_feedforward_layernorm``; Gemma norms scale by ``1 + weight``);
- the rows of ``up_proj`` for ``down_proj``'s input (``act(gate) * up`` is linear in ``up``);
- the rows of ``v_proj`` for ``o_proj``'s input (attention is linear in V); with grouped-query
  attention one factor per KV channel, shared by the query heads that read it.

A group is smoothed only when every consumer (and the producing linear, for up/v) is being
quantized; otherwise it is left alone. The folding into norms changes the model's parameters
in place; the transform saves them first so ``restore`` puts them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calibration import InputStats


@dataclass
class SmoothGroup:
    producer: nn.Module  # RMSNorm, or the linear whose rows produce the input (up_proj / v_proj)
    producer_name: str | None  # qualified name when the producer is a linear layer
    consumers: list[str]  # qualified names of the linear layers reading the input
    kv_repeat: int = 1  # v -> o: query heads per KV head
    head_dim: int = 0


def smoothing_groups(layer: nn.Module, prefix: str) -> list[SmoothGroup]:
    """The foldable (producer, consumers) pairs of a Llama/Qwen/Mistral/Gemma decoder layer."""
    groups = []
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    norm1 = getattr(layer, "input_layernorm", None)
    norm2 = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
    if attn is not None and norm1 is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        groups.append(SmoothGroup(norm1, None, [f"{prefix}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]))
    if attn is not None and hasattr(attn, "v_proj") and hasattr(attn, "o_proj"):
        head_dim = getattr(attn, "head_dim", 0)
        kv = attn.v_proj.out_features // head_dim if head_dim else 0
        if kv and attn.o_proj.in_features % (kv * head_dim) == 0:
            groups.append(
                SmoothGroup(attn.v_proj, f"{prefix}self_attn.v_proj", [f"{prefix}self_attn.o_proj"],
                            attn.o_proj.in_features // (kv * head_dim), head_dim)
            )
    if mlp is not None and norm2 is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
        groups.append(SmoothGroup(norm2, None, [f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"]))
    if mlp is not None and hasattr(mlp, "up_proj") and hasattr(mlp, "down_proj"):
        groups.append(SmoothGroup(mlp.up_proj, f"{prefix}mlp.up_proj", [f"{prefix}mlp.down_proj"]))
    return groups


def smooth_factors(absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """``s = absmax^alpha / max|W|^(1 - alpha)`` per input channel (clamped to stay finite)."""
    wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    s = absmax.clamp_min(1e-5).pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp(1e-4, 1e4)


def is_gemma_norm(norm: nn.Module) -> bool:
    return "gemma" in type(norm).__name__.lower()


def apply_smoothing(
    groups: list[SmoothGroup],
    weights: dict[str, Tensor],
    stats: dict[str, InputStats],
    alpha: float,
    save_param,
) -> dict[str, Tensor]:
    """Smooth every group whose linears are all in ``weights`` (float copies, changed in place).

    Returns the factor applied to each consumer's inputs, so callers can rescale the Hessians
    (``H' = H / (s s^T)``). Norm weights are changed in place after ``save_param`` saved them.
    """
    applied: dict[str, Tensor] = {}
    for grp in groups:
        names = grp.consumers + ([grp.producer_name] if grp.producer_name else [])
        if not all(n in weights and n in stats for n in grp.consumers) or any(n not in weights for n in names):
            continue
        absmax = stats[grp.consumers[0]].absmax
        cons = [weights[n] for n in grp.consumers]
        if grp.kv_repeat > 1:  # one factor per KV channel, shared by its query heads
            kvd = absmax.numel() // grp.kv_repeat // grp.head_dim
            view = (kvd, grp.kv_repeat, grp.head_dim)
            a = absmax.view(view).amax(1).flatten()
            wcols = [w.view(w.shape[0], *view).abs().amax(2).reshape(w.shape[0], -1) for w in cons]
            s_prod = smooth_factors(a, wcols, alpha)
            s = s_prod.view(kvd, 1, grp.head_dim).expand(view).reshape(-1)
        else:
            s = smooth_factors(absmax, cons, alpha)
            s_prod = s
        for n, w in zip(grp.consumers, cons, strict=True):
            w.mul_(s[None, :])
            applied[n] = s
        if grp.producer_name:
            weights[grp.producer_name].div_(s_prod[:, None])
            bias = getattr(grp.producer, "bias", None)
            if bias is not None:
                save_param(bias)
                bias.data.div_(s_prod.to(bias.dtype))
        else:
            w = grp.producer.weight
            save_param(w)
            if is_gemma_norm(grp.producer):
                w.data.copy_(((1 + w.data.float()) / s_prod - 1).to(w.dtype))
            else:
                w.data.copy_((w.data.float() / s_prod).to(w.dtype))
    return applied
