"""transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")``) as infertrix sees it.

transformers shards the weights named by the model's TP plan as DTensors over a device mesh and
puts each sharded module's collective on that module instance's ``forward``
(``transformers/distributed/tensor_parallel.py``): a ``colwise`` linear keeps its slice of the
output features, a ``rowwise`` one all-reduces its partial product, ``colwise_gather_output``
(the head) gathers the vocabulary. Every rank runs the same Python on the same token ids, so a
transform whose decisions depend only on replicated values (token ids, logits, sequence lengths,
the hidden states after a row-parallel all-reduce) makes the same decisions on every rank. A
transform that swaps a sharded module must keep that module's collective; one that cannot is
refused by ``optimize`` with its reason (:meth:`Transform.tensor_parallel_problem`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .transform import Transform, UnsupportedModelError


@dataclass(frozen=True)
class TensorParallel:
    """Where a sharded model's shards live: the TP process group, this rank, the ranks, the plan."""

    group: Any  # torch.distributed ProcessGroup of the "tp" mesh dimension
    rank: int
    world: int
    plan: dict[str, str]

    def style(self, name: str) -> str | None:
        """The plan's style for module ``name`` (``"colwise"``, ``"rowwise"``...), or None if unsharded."""
        return self.plan.get(re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name))


def tensor_parallel(model: nn.Module) -> TensorParallel | None:
    """The model's tensor parallelism, or None when it was loaded on one process (or tp_size 1)."""
    mesh = getattr(model, "_device_mesh", None)
    size = getattr(model, "_tp_size", None)
    if mesh is None or not size or size < 2:
        return None
    tp = mesh["tp"] if mesh.ndim > 1 else mesh
    return TensorParallel(group=tp.get_group(), rank=tp.get_local_rank(), world=tp.size(),
                          plan=dict(getattr(model, "_tp_plan", None) or {}))


def check_tensor_parallel(model: nn.Module, transforms: list[Transform]) -> None:
    """Refuse, before anything changes, the transforms that cannot act on a sharded ``model``."""
    tp = tensor_parallel(model)
    if tp is None:
        return
    for t in transforms:
        problem = t.tensor_parallel_problem(model, tp)
        if problem:
            raise UnsupportedModelError(
                f"{type(t).__name__} cannot run on a model sharded by transformers' tensor parallelism "
                f"(tp_size={tp.world}): {problem}"
            )
