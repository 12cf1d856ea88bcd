"""``ExpertOffload``: run an MoE model with only a budget of its experts in fast memory.

All experts go to an :class:`~infertrix.moe.store.ExpertStore` (safetensors on disk, or host
memory); each MoE layer keeps ``capacity`` of them in an :class:`~infertrix.moe.cache.ExpertCache`
(LRU or LFU); a :class:`~infertrix.moe.prefetch.Prefetcher` loads the next layer's likely experts
while the current layer computes; a miss fetches the expert or computes it where it is stored
(:class:`~infertrix.moe.miss_policy.MissPolicy`). Anchors: mixtral-offloading (Eliseev & Mazur
2023, arXiv:2312.17238), MoE-Infinity (arXiv:2401.14361), Fiddler (arXiv:2402.07033), Fate
(arXiv:2502.12224) and ExpertFlow (arXiv:2410.17954). ``expert_bits=8/4`` stores, moves and
computes the experts in int8/int4 (EdgeMoE, arXiv:2308.14352; :mod:`~infertrix.moe.lowbit`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.registry import register_transform
from ..core.transform import Applied, ConfigError, Stage, Transform
from ..engine.moe import ENGINE_CALLS  # the engine calls hooks so marked itself on MoE layers
from ..quant.int4 import check_group_size
from .cache import POLICIES, ExpertCache
from .discovery import MoELayer, find_moe_layers
from .expert_files import MANIFEST
from .experts import OffloadedExperts, OffloadRuntime
from .lowbit import BITS, LowBitFormat
from .miss_policy import MODES, MissPolicy
from .prefetch import Prefetcher
from .store import ExpertStore


def capacity_for(
    num_experts: int,
    num_layers: int,
    expert_bytes: int,
    budget: float,
    experts_per_layer: int | None,
    budget_bytes: int | None,
    float_bytes: int | None = None,
) -> int:
    """Experts kept per layer for a budget given as a fraction, a count or bytes. A fraction is of
    the float experts' bytes (``float_bytes`` each): low-bit experts fit that many more."""
    if experts_per_layer is not None:
        return min(experts_per_layer, num_experts)
    if budget_bytes is not None:
        return min(budget_bytes // (expert_bytes * num_layers), num_experts)
    ratio = (float_bytes or expert_bytes) / expert_bytes
    return min(max(1, math.floor(budget * num_experts * ratio + 1e-9)), num_experts)


@register_transform("offload", "expert_offload")
@dataclass
class ExpertOffload(Transform):
    """Keep a budget of each MoE layer's experts in fast memory; the rest in an expert store.

    Lossless: outputs equal the fully loaded model's (same per-expert computation, only the
    weights' location changes), unless ``expert_bits`` is 8 or 4 (lossy, see that field). Saves
    ``(1 - budget)`` of the experts' memory; costs reads on cache misses, which prefetch hides
    where it guesses right. Needs a transformers 5 MoE model
    (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and disk space for the store.

    Fields:
      budget: fraction of each layer's float experts' bytes kept resident (0 < budget <= 1): with
        float experts the fraction of experts; with ``expert_bits`` 8 or 4 the same bytes hold
        about 4x or 7x as many (capped at all of them). The recipe value (``offload:0.25``).
      experts_per_layer: resident experts per layer; overrides ``budget``.
      budget_bytes: bytes of fast memory for all layers' experts; overrides ``budget``.
      policy: eviction policy, ``"lru"`` or ``"lfu"``.
      prefetch: load the next layer's predicted experts in a background thread.
      prefetch_signal: the hidden state the next layer's router is applied to:
        ``"layer_output"`` (layer i's output, issued before layer i+1's attention: more accurate,
        75% of the upcycled SmolLM2's routed experts guessed right on prose) or ``"attention"``
        (layer i's residual after attention, issued before layer i's experts compute: more
        overlap, 64% right).
      miss_policy: ``"fetch"`` (load a missing expert into the cache), ``"in_place"`` (compute
        it where it is stored, Fiddler) or ``"auto"`` (whichever measured cheaper).
      tier: the store's tier: ``"disk"`` (safetensors files, memory-mapped, page cache dropped
        after each read) or ``"host"`` (all experts in host memory, pinned for a GPU cache).
      store_dir: folder of the store; reused when it already holds one (no experts written),
        else created. None: a temporary folder, deleted by ``restore``.
      device: device of the cache (default: where the experts are).
      expert_bits: None (default): experts as the model holds them; 8: int8 per-channel (W8A8
        kernel); 4: int4 in the W4A8 packing (``expert_group_size`` groups, zero points, MSE
        clipping). EdgeMoE's low-bit experts: a miss reads 1/4 (int8) or about 1/7 (int4) of a
        float32 expert, computed by the int kernels on the slot without dequantizing. Lossy (int
        weights and per-token int8 activations in the experts); ``restore`` puts back the
        dequantized experts.
      expert_group_size: int4 group size along the input (a multiple of 8, or -1).
      expert_gptq: quantize the low-bit experts by GPTQ (Frantar et al. 2022) from the tokens
        the router sends each expert on calibration text (``moe.calibrate``) instead of rounding
        to nearest: SmolLM2's int4 experts cost +4.0% perplexity instead of +14.6% (copy-upcycled).
        Needs the model's tokenizer (or ``calibration_ids``) and a minute or so; the calibration
        fields (``tokenizer``, ``calibration_text``, ``calibration_ids``, ``calibration_windows``,
        ``window_tokens``) are those of every family (``core.calibration``), read from the end
        of the shipped text by default.
      int8_layers: with ``expert_bits=4``, how many MoE layers keep int8 experts instead: those
        whose experts at int4 move the next-token distributions most, measured one layer at a time
        (EdgeMoE's bit widths by importance, per layer, ranked by the KL divergence of the next-token
        distributions; one pass over the calibration windows per layer). On the copy-upcycled
        SmolLM2 with GPTQ, int8_layers=4 took int4 from +4.0% to +2.6% perplexity. Each layer's
        cache holds its budget's bytes, so fewer of the wider experts.
    """
    use_when = "an MoE model's experts do not fit the fast memory: a budget of experts cached, the rest streamed"

    stage = Stage.EXPERTS
    conflict_group = "expert placement"
    primary = "budget"
    bench_recipe = None  # needs an MoE model; `infertrix bench --model <moe folder> --recipe offload:0.25`

    budget: float = 0.25
    experts_per_layer: int | None = None
    budget_bytes: int | None = None
    policy: str = "lru"
    prefetch: bool = True
    miss_policy: str = "fetch"
    prefetch_signal: str = "layer_output"
    tier: str = "disk"
    store_dir: str | None = None
    device: str | None = None
    expert_bits: int | None = None
    expert_group_size: int = 32
    expert_gptq: bool = False
    int8_layers: int = 0
    damp: float = 0.01
    tokenizer: Any = field(default=None, repr=False)
    calibration_text: Any = field(default=None, repr=False)
    calibration_ids: Any = field(default=None, repr=False)
    calibration_windows: int = 8
    window_tokens: int = 256
    progress: bool = True

    def validate(self) -> None:
        if not 0 < self.budget <= 1:
            raise ConfigError(f"budget is the fraction of experts kept resident, in (0, 1]; got {self.budget}")
        if self.experts_per_layer is not None and self.experts_per_layer < 1:
            raise ConfigError(f"experts_per_layer must be >= 1, got {self.experts_per_layer}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ConfigError(f"budget_bytes must be > 0, got {self.budget_bytes}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.miss_policy not in MODES:
            raise ConfigError(f"miss_policy must be one of {MODES}, got {self.miss_policy!r}")
        if self.prefetch_signal not in ("layer_output", "attention"):
            raise ConfigError(f"prefetch_signal must be 'layer_output' or 'attention', got {self.prefetch_signal!r}")
        if self.tier not in ("disk", "host"):
            raise ConfigError(f"tier must be 'disk' or 'host', got {self.tier!r}")
        if self.expert_bits is not None and self.expert_bits not in BITS:
            raise ConfigError(f"expert_bits must be None (float experts as the model holds them), 8 or 4; "
                              f"got {self.expert_bits}")
        check_group_size(self.expert_group_size)
        if self.expert_gptq and self.expert_bits is None:
            raise ConfigError("expert_gptq quantizes low-bit experts; pass expert_bits=8 or 4 with it")
        if self.int8_layers < 0 or (self.int8_layers and self.expert_bits != 4):
            raise ConfigError(f"int8_layers keeps some layers' experts in int8 among int4 ones: a count >= 0 with "
                              f"expert_bits=4; got int8_layers={self.int8_layers}, expert_bits={self.expert_bits}")

    def expert_format(self, layer: MoELayer, bits: int | None = None) -> LowBitFormat | None:
        """The low-bit layout of this layer's experts (None: float experts); ``bits``: another width."""
        bits = bits or self.expert_bits
        if bits is None:
            return None
        e = layer.experts
        return LowBitFormat(bits, self.expert_group_size, tuple(e.gate_up_proj.shape[1:]), tuple(e.down_proj.shape[1:]))

    def check_model(self, model: nn.Module) -> None:
        layers = find_moe_layers(model)
        first = layers[0]
        e = first.experts
        float_bytes = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.element_size()
        if self.int8_layers >= len(layers):
            raise ConfigError(f"int8_layers={self.int8_layers} leaves none of the model's {len(layers)} MoE layers in "
                              "int4; for int8 experts everywhere use expert_bits=8")
        fmt = self.expert_format(first, 8 if self.int8_layers else None)  # the widest experts bound the count
        expert_bytes = float_bytes if fmt is None else fmt.nbytes
        cap = capacity_for(first.num_experts, len(layers), expert_bytes, self.budget, self.experts_per_layer,
                           self.budget_bytes, float_bytes)
        top_k = max(layer.top_k for layer in layers)
        if cap < top_k:
            raise ConfigError(
                f"the expert budget gives {cap} resident experts per layer, fewer than top-k={top_k} "
                f"(each token uses {top_k} experts of a layer at once); raise the budget to at least "
                f"{top_k} experts per layer ({top_k * expert_bytes * len(layers)} bytes, or "
                f"budget={top_k / first.num_experts:.3g})"
            )

    def apply(self, model: nn.Module) -> Applied:
        layers = find_moe_layers(model)
        first = layers[0]
        device = torch.device(self.device) if self.device else first.experts.gate_up_proj.device
        on_meta = first.experts.gate_up_proj.device.type == "meta"
        if device.type == "meta":  # experts never loaded (load_offloaded): the cache lives on the CPU
            device = torch.device("cpu")
        owned_dir = self.store_dir is None
        if on_meta and (owned_dir or not (Path(self.store_dir) / MANIFEST).exists()):
            raise ConfigError(
                "the experts are on the meta device (not loaded), so ExpertOffload cannot write them to a "
                "store; pass store_dir= of a store made by ExpertStore.from_checkpoint (or use load_offloaded)"
            )
        path = Path(tempfile.mkdtemp(prefix="infertrix-experts-")) if owned_dir else Path(self.store_dir)
        store = self._store(model, layers, path, pin=device.type == "cuda" and self.tier == "host")
        float_bytes = (math.prod(store.gate_up_shape) + math.prod(store.down_shape)) * store.dtype.itemsize
        cap = {i: capacity_for(first.num_experts, len(layers), store.bytes_of(i), self.budget, self.experts_per_layer,
                               self.budget_bytes, float_bytes) for i in store.layers}
        cache = ExpertCache(
            store, cap, self.policy, device, MissPolicy(self.miss_policy), top_k=max(x.top_k for x in layers)
        )
        prefetcher = Prefetcher(cache) if self.prefetch else None
        runtime = OffloadRuntime(cache, layers, prefetcher, early=self.prefetch_signal == "attention")

        hooks = []
        if prefetcher is not None:
            for layer in layers:
                if layer.index not in runtime.next_of:
                    continue
                if self.prefetch_signal == "layer_output":
                    hooks.append(layer.decoder_layer.register_forward_hook(_after_layer(runtime, layer.index)))
                elif layer.norm is not None:
                    hooks.append(layer.norm.register_forward_pre_hook(_capture(runtime, layer.index)))

        originals: list[tuple[MoELayer, dict[str, Any]]] = []
        for layer in layers:
            orig = layer.experts
            meta = {
                name: (p.dtype, device if p.device.type == "meta" else p.device, p.requires_grad)
                for name, p in (("gate_up_proj", orig.gate_up_proj), ("down_proj", orig.down_proj))
            }
            layer.block.experts = OffloadedExperts(orig, layer.index, runtime)
            # free the fused weights: the store has them, restore() reads them back
            for name, (dtype, dev, _rg) in meta.items():
                setattr(orig, name, nn.Parameter(torch.empty(0, dtype=dtype, device=dev), requires_grad=False))
            originals.append((layer, meta))

        def undo() -> None:
            if prefetcher is not None:
                prefetcher.stop()
            for h in hooks:
                h.remove()
            for layer, meta in originals:
                gu, dn = store.load_layer(layer.index)
                for name, t in (("gate_up_proj", gu), ("down_proj", dn)):
                    dtype, dev, rg = meta[name]
                    setattr(layer.experts, name, nn.Parameter(t.to(dev, dtype), requires_grad=rg))
                layer.block.experts = layer.experts
            store.close()
            if owned_dir:
                shutil.rmtree(path, ignore_errors=True)

        return Applied(self, undo=undo, report=lambda: _report(runtime))

    def _store(self, model: nn.Module, layers: list[MoELayer], path: Path, pin: bool) -> ExpertStore:
        """The store at ``path``: reopened (it must match the model and these settings), else
        written from the model, calibrated first with ``expert_gptq``."""
        if (path / MANIFEST).exists():
            store = ExpertStore.open(path, tier=self.tier, pin_memory=pin)
            _check_store(store, layers, self.expert_bits, "gptq" if self.expert_gptq else "nearest")
            _check_settings(store, self)
            if len(store.layer_formats) != self.int8_layers:
                raise ConfigError(f"the expert store at {store.path} has {len(store.layer_formats)} layers of int8 "
                                  f"experts, not int8_layers={self.int8_layers}; pass another store_dir or delete "
                                  "that folder")
            return store
        from .calibrate import write_store

        return write_store(self, model, layers, path, tier=self.tier, pin_memory=pin)


def offload_runtime(model: nn.Module) -> OffloadRuntime:
    """The cache, store and prefetcher of a model with ExpertOffload applied."""
    for layer in model.modules():
        if isinstance(layer, OffloadedExperts):
            return layer.runtime
    raise ConfigError("this model has no offloaded experts; apply ExpertOffload first")


def _after_layer(runtime: OffloadRuntime, index: int):
    def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        runtime.prefetch_after(index, hidden.detach())

    setattr(hook, ENGINE_CALLS, True)
    return hook


def _capture(runtime: OffloadRuntime, index: int):
    def hook(_module: nn.Module, args: tuple) -> None:
        runtime.residual[index] = args[0].detach()

    setattr(hook, ENGINE_CALLS, True)
    return hook


def _check_store(store: ExpertStore, layers: list[MoELayer], bits: int | None, rounding: str) -> None:
    want = [x.index for x in layers]
    e = layers[0].experts
    shapes = (tuple(e.gate_up_proj.shape[1:]), tuple(e.down_proj.shape[1:]), layers[0].num_experts)
    have = (store.gate_up_shape, store.down_shape, store.num_experts)
    if store.layers != want or have != shapes:
        raise ConfigError(
            f"the expert store at {store.path} does not match this model (layers {store.layers} vs {want}, "
            f"shapes {have} vs {shapes}); pass another store_dir or delete that folder"
        )
    if (None if store.format is None else store.format.bits) != bits:
        raise ConfigError(
            f"the expert store at {store.path} holds {store.bits}-bit experts, not the requested "
            f"expert_bits={bits}; pass another store_dir or delete that folder"
        )
    if bits is not None and store.rounding != rounding:
        raise ConfigError(
            f"the expert store at {store.path} holds experts quantized by {store.rounding!r} rounding, not "
            f"{rounding!r} (expert_gptq={rounding == 'gptq'}); pass another store_dir or delete that folder"
        )


def _check_settings(store: ExpertStore, cfg: ExpertOffload) -> None:
    """A reused low-bit store must have been written with these int4 groups and GPTQ dampening."""
    fmt = store.format
    have = {"expert_group_size": None if fmt is None or fmt.bits != 4 else fmt.group_size,
            "damp": store.manifest.get("damp")}
    want = {"expert_group_size": have["expert_group_size"] and cfg.expert_group_size,
            "damp": cfg.damp if store.rounding == "gptq" else None}
    if have != want:
        raise ConfigError(f"the expert store at {store.path} was written with {have}, not {want}; pass another "
                          "store_dir or delete that folder")


def _resident(cache: ExpertCache) -> str:
    caps = sorted(set(cache.capacities.values()))
    n = "/".join(map(str, caps))
    return f"{n}/{cache.store.num_experts} experts per layer" + ("" if len(caps) == 1 else " (by width)")


def _report(runtime: OffloadRuntime) -> dict[str, Any]:
    cache = runtime.cache
    total = cache.stats()
    per_layer = {i: f"{s.hit_rate:.1%} ({s.hits}/{s.requests})" for i, s in cache.layer_stats().items()}
    pf = runtime.prefetcher
    return {  # byte counts in bytes (describe's text shows them in MiB)
        "store": f"{cache.store.path} ({cache.store.tier})",
        "store_bytes": cache.store.total_bytes,
        "resident": _resident(cache),
        "expert_bits": cache.store.bits,
        **({"int8_layers": sorted(cache.store.layer_formats)} if cache.store.layer_formats else {}),
        **({} if cache.store.format is None else {"expert_rounding": cache.store.rounding_note}),
        "bytes_per_expert": cache.store.expert_bytes,
        **({"bytes_per_int8_expert": cache.store.bytes_of(min(cache.store.layer_formats))}
           if cache.store.layer_formats else {}),
        **({"layer_costs": cache.store.manifest["layer_costs"]} if "layer_costs" in cache.store.manifest else {}),
        "budget_bytes": cache.budget_bytes,
        "resident_bytes": cache.resident_bytes(),
        "policy": cache.policy,
        "prefetch": "off" if pf is None else ("running" if pf.alive else f"stopped ({pf.error!r})"),
        "miss_policy": f"{cache.miss_policy.mode} {cache.miss_policy.costs()}",
        "stats": total.to_dict(),
        "hit_rate_per_layer": per_layer,
    }
