"""Finding the MoE layers of a transformers 5 model: the fused experts module and its router.

transformers 5 stores a layer's experts as one module (``MixtralExperts``, ``Qwen2MoeExperts``,
``Qwen3MoeExperts``, ``OlmoeExperts``...) holding two fused 3-D parameters, ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, called by its sparse-MoE block as
``experts(hidden_states, top_k_index, top_k_weights)`` after the block's router (``gate``) picked
the top-k experts per token. That call is the seam infertrix plugs into (see
``transformers/integrations/moe.py``): the router, the shared experts and the rest of the model
stay the model's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.model import decoder_layers, model_type
from ..core.transform import UnsupportedModelError

#: model types whose experts were checked for exactness in tests/moe.
SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass
class MoELayer:
    """One decoder layer's MoE pieces."""

    index: int  # decoder layer index
    block: nn.Module  # the sparse MoE block (``layer.mlp``)
    experts: nn.Module  # the fused experts module (``block.experts``)
    router: nn.Module  # the top-k router (``block.gate``) with ``weight`` [E, H] and ``top_k``
    norm: nn.Module | None  # the norm that feeds the block (``post_attention_layernorm``)
    decoder_layer: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def _is_fused_experts(module: nn.Module) -> bool:
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` in order; raises UnsupportedModelError naming what is missing."""
    layers = decoder_layers(model)
    out: list[MoELayer] = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is None:
            continue
        if not _is_fused_experts(experts):
            if getattr(experts, "_infertrix_offloaded", False):
                raise UnsupportedModelError(
                    "the experts of this model are already offloaded; restore(model) first"
                )
            raise UnsupportedModelError(
                f"layer {i}'s experts ({type(experts).__name__}) do not hold fused 3-D gate_up_proj/"
                "down_proj parameters as transformers 5's MoE models do; upgrade transformers to 5.x"
            )
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            raise UnsupportedModelError(
                f"{type(experts).__name__} has biases or no gate projection; ExpertOffload supports "
                f"gated, bias-free experts ({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        router = getattr(block, "gate", None)
        if router is None or not hasattr(router, "top_k") or getattr(router, "weight", None) is None:
            raise UnsupportedModelError(
                f"layer {i}'s MoE block has no top-k router `gate` with a `weight`; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        out.append(MoELayer(i, block, experts, router, getattr(layer, "post_attention_layernorm", None), layer))
    if not out:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type(model)!r}) has no Mixture-of-Experts layers; "
            f"expert offloading needs an MoE model such as {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return out
