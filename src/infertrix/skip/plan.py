"""``SkipPlan``: the common currency of the skip family.

A plan is a set of ``(layer, sublayer)`` pairs, ``sublayer`` one of ``"layer"`` (the whole
decoder layer), ``"attention"`` or ``"mlp"``, each with the score that chose it. Strategies
(uniform, ShortGPT, attention dropping, ...) produce plans; plans print, save and load as JSON,
are validated against a model, and are applied by swapping modules of *that* model for
pass-through modules (nothing global is patched). ``SkipPlan.apply`` returns a handle whose
``undo`` puts the very same module objects back; ``plan.active(model)`` (or
``skipping(model, plan)``) does both around a block, cheaply enough to toggle per forward pass,
which is what self-speculative decoding needs (draft with the plan, verify without it, one model,
one KV cache).

KV cache: a skipped attention (or whole layer) never calls ``cache.update`` for its
``layer_idx``, so transformers' ``DynamicCache`` keeps that layer's entry empty (memory saved), or,
when a plan is active only for some forward passes, untouched. The cache reports its length from
layer 0 and builds attention masks from the first full-attention (and first sliding-attention)
layer, so those *anchor* layers never have their attention skipped; validation says so.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..core.model import decoder_layers, model_type, text_config
from ..core.transform import ConfigError, UnsupportedModelError
from .modules import PASS_THROUGH, SkippedAttention, SkippedLayer, SkippedMLP

SUBLAYERS = ("layer", "attention", "mlp")
_SUB_ATTR = {"attention": "self_attn", "mlp": "mlp"}
FORMAT_VERSION = 1


@dataclass(frozen=True, order=True)
class SkipEntry:
    """One skipped unit: decoder layer ``layer``'s ``sublayer``, chosen with ``score``.

    ``score`` is what the strategy ranked by (a similarity, a block influence, a position), or
    None for hand-written plans.
    """

    layer: int
    sublayer: str = "layer"
    score: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.sublayer not in SUBLAYERS:
            raise ConfigError(f"sublayer must be one of {SUBLAYERS}, got {self.sublayer!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ConfigError(f"layer must be a non-negative int, got {self.layer!r}")

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.sublayer)


@dataclass(frozen=True)
class SublayerCosts:
    """Weights (multiply-accumulates per token) of one decoder layer's sublayers, from the config.

    The share of decoder compute a plan skips is measured with these: decode is dominated by
    streaming these weights, so they are the right unit for "x% of the compute skipped".
    """

    attention: int
    mlp: int
    num_layers: int

    @property
    def layer(self) -> int:
        return self.attention + self.mlp

    @property
    def total(self) -> int:
        return self.layer * self.num_layers

    def of(self, sublayer: str) -> int:
        return {"layer": self.layer, "attention": self.attention, "mlp": self.mlp}[sublayer]

    @classmethod
    def from_model(cls, model: nn.Module) -> SublayerCosts:
        cfg = text_config(model)
        hidden = cfg.hidden_size
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        mlp = 3 * hidden * cfg.intermediate_size  # gate, up, down (all supported models are gated)
        return cls(attention, mlp, cfg.num_hidden_layers)


def anchor_layers(model: nn.Module) -> set[int]:
    """Layers whose attention must run: layer 0 (``get_seq_length``) and the first layer of each
    attention type (``create_causal_mask`` / ``create_sliding_window_causal_mask`` read their size)."""
    anchors = {0}
    types = getattr(text_config(model), "layer_types", None)
    if types:
        for kind in set(types):
            anchors.add(list(types).index(kind))
    return anchors


class SkipPlan:
    """A set of skipped ``(layer, sublayer)`` pairs with their scores; see the module docstring.

    Build one by hand with ``SkipPlan.of(layers=[...], attention=[...], mlp=[...])`` or
    ``SkipPlan([SkipEntry(5, "mlp", 0.98), ...])``; strategies return one from ``.plan(model)``.
    ``method``, ``num_layers`` (of the model it was made for) and ``meta`` (free-form, e.g. the
    calibration settings) travel with it through ``save``/``load``.
    """

    def __init__(
        self,
        entries: Iterable[SkipEntry] = (),
        method: str = "manual",
        num_layers: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        by_key: dict[tuple[int, str], SkipEntry] = {}
        for e in entries:
            if not isinstance(e, SkipEntry):
                raise ConfigError(f"SkipPlan entries must be SkipEntry objects, got {type(e).__name__}")
            if e.key in by_key:
                raise ConfigError(f"SkipPlan names layer {e.layer} {e.sublayer} twice; list each pair once")
            by_key[e.key] = e
        for layer, sub in by_key:
            if sub != "layer" and (layer, "layer") in by_key:
                raise ConfigError(
                    f"SkipPlan skips layer {layer} whole and also its {sub}; keep only the 'layer' entry"
                )
        if num_layers is not None:
            bad = [e.layer for e in by_key.values() if e.layer >= num_layers]
            if bad:
                raise ConfigError(f"SkipPlan names layers {sorted(set(bad))} but num_layers={num_layers}")
        self.entries: tuple[SkipEntry, ...] = tuple(sorted(by_key.values()))
        self.method = method
        self.num_layers = num_layers
        self.meta = dict(meta or {})

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def of(
        cls,
        layers: Iterable[int] = (),
        attention: Iterable[int] = (),
        mlp: Iterable[int] = (),
        **kwargs: Any,
    ) -> SkipPlan:
        """A plan from layer indices: whole ``layers``, ``attention`` sublayers, ``mlp`` sublayers."""
        entries = [SkipEntry(int(i), "layer") for i in layers]
        entries += [SkipEntry(int(i), "attention") for i in attention]
        entries += [SkipEntry(int(i), "mlp") for i in mlp]
        return cls(entries, **kwargs)

    def __or__(self, other: SkipPlan) -> SkipPlan:
        """Union of two plans (a whole-layer entry absorbs the same layer's sublayer entries)."""
        merged = {e.key: e for e in self.entries}
        for e in other.entries:
            merged.setdefault(e.key, e)
        whole = {layer for layer, sub in merged if sub == "layer"}
        kept = [e for e in merged.values() if e.sublayer == "layer" or e.layer not in whole]
        method = self.method if self.method == other.method else f"{self.method}|{other.method}"
        return SkipPlan(kept, method, self.num_layers or other.num_layers, {**other.meta, **self.meta})

    # -- inspection ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SkipEntry]:
        return iter(self.entries)

    def __contains__(self, item: object) -> bool:
        key = item.key if isinstance(item, SkipEntry) else item
        return any(e.key == key for e in self.entries)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkipPlan):
            return NotImplemented
        return [(e.key, e.score) for e in self.entries] == [(e.key, e.score) for e in other.entries] and (
            self.method,
            self.num_layers,
            self.meta,
        ) == (other.method, other.num_layers, other.meta)

    def indices(self, sublayer: str) -> list[int]:
        """Layer indices skipped as ``sublayer`` (``"layer"``, ``"attention"`` or ``"mlp"``)."""
        return [e.layer for e in self.entries if e.sublayer == sublayer]

    def skips_attention(self, layer: int) -> bool:
        return (layer, "layer") in self or (layer, "attention") in self

    def compute_fraction(self, model_or_costs: nn.Module | SublayerCosts) -> float:
        """Share of the decoder layers' weights (compute per token) this plan skips, in [0, 1]."""
        costs = model_or_costs if isinstance(model_or_costs, SublayerCosts) else SublayerCosts.from_model(model_or_costs)
        skipped = sum(costs.of(e.sublayer) for e in self.entries)
        return skipped / costs.total

    def units(self) -> str:
        """The skipped units as ``layer:sublayer``, comma-separated (``"1:mlp, 3:layer"``)."""
        return ", ".join(f"{e.layer}:{e.sublayer}" for e in self.entries)

    def __repr__(self) -> str:
        return f"SkipPlan(method={self.method!r}, [{self.units()}])"

    def __str__(self) -> str:
        head = f"SkipPlan[{self.method}]: {len(self.entries)} skipped"
        if self.num_layers is not None:
            head += f" of {self.num_layers} layers"
        lines = [head]
        for e in self.entries:
            score = "" if e.score is None else f"  score={e.score:.4f}"
            lines.append(f"  layer {e.layer:3d} {e.sublayer:9s}{score}")
        return "\n".join(lines)

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "infertrix.skip_plan",
            "version": FORMAT_VERSION,
            "method": self.method,
            "num_layers": self.num_layers,
            "meta": self.meta,
            "entries": [{"layer": e.layer, "sublayer": e.sublayer, "score": e.score} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipPlan:
        if data.get("format") != "infertrix.skip_plan":
            raise ConfigError("not a skip plan: expected a JSON object with format='infertrix.skip_plan'")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ConfigError(f"skip plan format version {data['version']} is newer than this infertrix reads")
        entries = [SkipEntry(int(e["layer"]), e.get("sublayer", "layer"), e.get("score")) for e in data["entries"]]
        return cls(entries, data.get("method", "manual"), data.get("num_layers"), data.get("meta"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SkipPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SkipPlan:
        return cls.from_json(Path(path).read_text())

    # -- model binding ------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError / ConfigError unless this plan can be applied to ``model``."""
        layers = decoder_layers(model)
        n = len(layers)
        name = f"this {model_type(model)} model"
        if self.num_layers is not None and self.num_layers != n:
            raise ConfigError(
                f"this SkipPlan was made for a model with {self.num_layers} layers but {name} has {n}; "
                "build the plan for this model"
            )
        out = sorted({e.layer for e in self.entries if e.layer >= n})
        if out:
            raise ConfigError(
                f"SkipPlan skips layers {out} but {name} has {n} decoder layers (0..{n - 1}); "
                "build the plan for this model"
            )
        anchors = anchor_layers(model)
        bad = sorted(e.layer for e in self.entries if e.sublayer != "mlp" and e.layer in anchors)
        if bad:
            raise ConfigError(
                f"SkipPlan skips the attention of layer(s) {bad}, but the KV cache reads its length and mask "
                f"sizes from layers {sorted(anchors)} of {name}; skip their MLP only, or other layers"
            )
        for e in self.entries:
            if e.sublayer == "layer":
                continue
            attr = _SUB_ATTR[e.sublayer]
            if not isinstance(getattr(layers[e.layer], attr, None), nn.Module) and not isinstance(
                layers[e.layer], SkippedLayer
            ):
                raise UnsupportedModelError(
                    f"decoder layer {e.layer} of {name} has no `{attr}` module, so its {e.sublayer} cannot "
                    "be skipped; skip the whole layer instead"
                )

    def apply(self, model: nn.Module) -> SkipHandle:
        """Swap the planned modules of ``model`` for pass-through modules; ``handle.undo()`` reverts.

        The handle is listed in the model's skip state while applied (when the model carries an
        infertrix record), which is where the decode engine reads what is skipped."""
        from ..core.state import state
        from .state import skip_state

        self.validate(model)
        layers = decoder_layers(model)
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for e in self.entries:
                if e.sublayer == "layer":
                    current = layers[e.layer]
                    if isinstance(current, SkippedLayer):
                        continue  # already skipped by an enclosing plan
                    stub = SkippedLayer(e.layer, getattr(current, "attention_type", None))
                    swaps.append((layers, str(e.layer), current))
                    layers[e.layer] = stub
                else:
                    parent = layers[e.layer]
                    if isinstance(parent, SkippedLayer):
                        continue
                    attr = _SUB_ATTR[e.sublayer]
                    current = getattr(parent, attr)
                    if isinstance(current, PASS_THROUGH):
                        continue
                    stub = SkippedAttention(e.layer) if e.sublayer == "attention" else SkippedMLP(e.layer)
                    swaps.append((parent, attr, current))
                    setattr(parent, attr, stub)
        except BaseException:
            SkipHandle(self, swaps).undo()
            raise
        handle = SkipHandle(self, swaps)
        if state(model) is not None:
            handle.registry = skip_state(model, create=True).handles
            handle.registry.append(handle)
        return handle

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[SkipHandle]:
        """Run ``model`` with this plan inside the block; the original modules return on exit.

        Same model object, no weight copies, same KV-cache layout (skipped layers' entries are left
        as they are): the draft side of self-speculative decoding.
        """
        handle = self.apply(model)
        try:
            yield handle
        finally:
            handle.undo()


@dataclass
class SkipHandle:
    """The record of one ``SkipPlan.apply``: the swapped modules, to put back with ``undo``."""

    plan: SkipPlan
    swaps: list[tuple[nn.Module, str, nn.Module]]
    undone: bool = False
    registry: list[SkipHandle] | None = field(default=None, repr=False)  # the skip state's handles

    def held(self) -> list[Tensor]:
        """The tensors of the modules swapped out (kept for ``undo``), for describe."""
        if self.undone:
            return []
        return [t for _, _, m in self.swaps for t in itertools.chain(m.parameters(), m.buffers())]

    def undo(self) -> None:
        """Put back the original modules (the same objects), newest swap first. Idempotent."""
        if self.undone:
            return
        for parent, attr, original in reversed(self.swaps):
            if isinstance(parent, nn.ModuleList):
                parent[int(attr)] = original
            else:
                setattr(parent, attr, original)
        self.undone = True
        if self.registry is not None:
            self.registry[:] = [h for h in self.registry if h is not self]


@contextmanager
def skipping(model: nn.Module, plan: SkipPlan | None) -> Iterator[SkipHandle | None]:
    """``with skipping(model, plan): ...`` runs ``model`` with ``plan`` active (None: no change)."""
    if plan is None or len(plan) == 0:
        yield None
        return
    with plan.active(model) as handle:
        yield handle


def rollback_cache(cache: Any, length: int) -> None:
    """Crop every layer of ``cache`` that holds more than ``length`` tokens back to ``length``.

    ``DynamicCache.crop`` removes the same number of tokens from every layer, which is wrong after
    a draft pass with a plan active: skipped layers did not grow. This crops each layer to an
    absolute length instead (layers already at or below ``length`` are left alone).
    """
    for layer in getattr(cache, "layers", []):
        if not getattr(layer, "is_initialized", False):
            continue
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)
