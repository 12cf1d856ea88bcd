"""``ReduceTopK``: route each token to fewer experts than the model was trained with. LOSSY.

Each MoE layer's router keeps picking the highest-scoring experts, only ``top_k`` of them instead
of the model's ``num_experts_per_tok``: a top-2 model run at top-1 computes half the expert FLOPs
and, with :class:`~infertrix.moe.ExpertOffload`, needs half the expert reads per token (and
allows a budget of one expert per layer). The outputs change: this is an explicit quality-for-
speed trade, never applied by ``ExpertOffload`` itself. Dynamic or reduced top-k as an inference
knob is studied in e.g. "Not All Experts are Equal" (Lu et al. 2024, arXiv:2402.14800, dynamic
expert skipping) and AdapMoE (Zhong et al. 2024, arXiv:2408.10284, adaptive gating for offloaded
MoE inference); this transform is the static form.

The kept experts' weights follow the model's own rule: Mixtral, Qwen3-MoE (``norm_topk_prob``)
and OLMoE (when normalising) renormalise them over the kept experts, so a top-1 token gets its
expert with weight 1; Qwen2-MoE without ``norm_topk_prob`` keeps the raw router probability.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.model import decoder_layers
from ..core.registry import register_transform
from ..core.transform import Applied, ConfigError, Stage, Transform, UnsupportedModelError


def _routers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(MoE block, top-k router) of each MoE layer, whether or not its experts are offloaded."""
    out = []
    for layer in decoder_layers(model):
        block = getattr(layer, "mlp", None)
        router = getattr(block, "gate", None)
        if getattr(block, "experts", None) is not None and isinstance(getattr(router, "top_k", None), int):
            out.append((block, router))
    if not out:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no Mixture-of-Experts layers with a top-k router (`mlp.gate.top_k`); "
            "ReduceTopK needs an MoE model such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE"
        )
    return out


@register_transform("reduce_top_k", "topk")
@dataclass
class ReduceTopK(Transform):
    """Route every token to ``top_k`` experts per MoE layer instead of the model's own top-k.

    LOSSY (outputs change). Saves ``1 - top_k / k`` of the expert compute and, offloaded, of the
    expert reads. Fields: ``top_k`` (>= 1, at most the model's top-k; the recipe value, ``topk:1``).
    """
    use_when = "an MoE model whose quality holds with fewer experts per token: less compute, lossy"

    stage = Stage.EXPERTS
    conflict_group = "expert routing"
    primary = "top_k"
    bench_recipe = None  # needs an MoE model

    top_k: int = 1

    def validate(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"ReduceTopK.top_k must be an integer >= 1, got {self.top_k!r}")

    def check_model(self, model: nn.Module) -> None:
        trained = max(router.top_k for _block, router in _routers(model))
        if self.top_k > trained:
            raise ConfigError(
                f"ReduceTopK(top_k={self.top_k}) would raise the model's top-k ({trained}); it only "
                f"reduces it: pass top_k between 1 and {trained}"
            )

    def apply(self, model: nn.Module) -> Applied:
        saved = []
        for block, router in _routers(model):
            saved.append((block, router, router.top_k, getattr(block, "top_k", None)))
            router.top_k = min(self.top_k, router.top_k)
            if isinstance(getattr(block, "top_k", None), int):  # kept in step (unused by the forward)
                block.top_k = router.top_k

        def undo() -> None:
            for block, router, k, block_k in saved:
                router.top_k = k
                if block_k is not None:
                    block.top_k = block_k

        return Applied(self, undo=undo, report=lambda: {"top_k": f"{self.top_k} (was {saved[0][2]}); lossy"})
