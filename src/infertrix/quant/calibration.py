"""The layer-by-layer pass that quantizes a model on calibration windows.

The windows come from :mod:`infertrix.core.calibration` (by default the END of the shipped Pride
and Prejudice, so that the perplexity measured on its beginning is not calibrated on).
``sequential_quantize`` captures the inputs of the first decoder layer (and every layer's keyword
arguments: masks, rotary embeddings) in one float forward pass, then walks the layers in order:
for each it records the statistics of its linear layers' inputs (per-channel absmax for
smoothing, ``X^T X`` for GPTQ), hands them to the method's callback (which smooths, quantizes and
swaps the layers in), and runs the now-quantized layer to produce the next layer's inputs, so
later layers are calibrated on what the quantized model really computes (GPTQ's sequential
scheme). A tqdm progress bar shows the layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.calibration import run_windows
from ..core.generation import CACHE_KWARGS
from ..core.model import decoder_layers


@dataclass
class InputStats:
    """Statistics of one linear layer's inputs over the calibration tokens."""

    absmax: Tensor  # [K] max |x| per input channel
    hessian: Tensor | None  # [K, K] sum of x x^T (float64), when collected
    tokens: int = 0


def _stats_hook(stats: dict[str, InputStats], name: str, in_features: int, hessian: bool):
    def hook(_mod, args):
        x = args[0].detach().reshape(-1, in_features).float()
        st = stats.get(name)
        if st is None:
            st = stats[name] = InputStats(
                torch.zeros(in_features), torch.zeros(in_features, in_features, dtype=torch.float64) if hessian else None
            )
        torch.maximum(st.absmax, x.abs().amax(0), out=st.absmax)
        if st.hessian is not None:
            st.hessian += (x.t() @ x).double()
        st.tokens += x.shape[0]

    return hook


def collect_stats(modules: dict[str, nn.Module], run: Callable[[], None], hessian: bool) -> dict[str, InputStats]:
    """Run ``run()`` with hooks recording the inputs of ``modules``."""
    stats: dict[str, InputStats] = {}
    handles = [
        m.register_forward_pre_hook(_stats_hook(stats, n, m.in_features, hessian)) for n, m in modules.items()
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


def _layer_output(out):
    return out[0] if isinstance(out, tuple | list) else out


# callback(layer_index or "lm_head", {name: linear}, {name: stats}) quantizes and swaps the layers
LayerCallback = Callable[[int | str, dict[str, nn.Module], dict[str, InputStats]], None]


@torch.no_grad()
def sequential_quantize(
    model: nn.Module,
    targets: dict[str, nn.Module],
    windows: Tensor,
    callback: LayerCallback,
    hessian: bool,
    lm_head_name: str | None = None,
    progress: bool = True,
) -> None:
    """Walk the decoder layers with calibration ``windows`` [n, L], calling ``callback`` for each layer's targets."""
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    layer_names = {id(layer): name for name, layer in model.named_modules()}
    inputs: list[Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def capture(i):
        def hook(_mod, args, kw):
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                inputs.append(h.detach())
            kwargs[i].append({k: v for k, v in kw.items() if k not in (*CACHE_KWARGS, "past_key_value")})
        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        run_windows(model, windows, progress, desc="calibration inputs")
    finally:
        for h in handles:
            h.remove()

    hs = inputs
    bar = tqdm(total=len(layers) + (1 if lm_head_name else 0), desc="calibrating", disable=not progress)
    for i, layer in enumerate(layers):
        prefix = layer_names[id(layer)] + "."
        mine = {n: m for n, m in targets.items() if n.startswith(prefix)}

        def run_layer(layer=layer, i=i, hs=hs):
            return [_layer_output(layer(h, **kw)) for h, kw in zip(hs, kwargs[i], strict=True)]

        if mine:
            stats = collect_stats(mine, run_layer, hessian)
            callback(i, mine, stats)
        hs = run_layer()
        bar.update(1)
    if lm_head_name:
        norm = final_norm(model)
        xs = [norm(h) for h in hs]
        head = targets[lm_head_name]
        stats = collect_stats({lm_head_name: head}, lambda: [head(x) for x in xs], hessian)
        callback("lm_head", {lm_head_name: head}, stats)
        bar.update(1)
    bar.close()


def final_norm(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    for candidate in (inner, getattr(inner, "language_model", None)):
        norm = getattr(candidate, "norm", None) if candidate is not None else None
        if isinstance(norm, nn.Module):
            return norm
    return nn.Identity()
