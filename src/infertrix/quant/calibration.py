"""Calibration data and the layer-by-layer pass that quantizes a model with it.

``find_tokenizer`` finds the model's own tokenizer when the user passed none (a recipe string
cannot pass one): the one ``infertrix.models.load`` returned with it, else the folder or hub id the
model was loaded from (``name_or_path``; a GGUF folder through its one ``.gguf`` file).
``calibration_inputs`` cuts a few token windows out of real text (by default the END of the shipped
Pride and Prejudice, so that the perplexity measured on its beginning is not calibrated on).
``sequential_quantize`` captures the inputs of the first decoder layer (and every layer's keyword
arguments: masks, rotary embeddings) in one float forward pass, then walks the layers in order:
for each it records the statistics of its linear layers' inputs (per-channel absmax for
smoothing, ``X^T X`` for GPTQ), hands them to the method's callback (which smooths, quantizes and
swaps the layers in), and runs the now-quantized layer to produce the next layer's inputs, so
later layers are calibrated on what the quantized model really computes (GPTQ's sequential
scheme). A tqdm progress bar shows the layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.generation import CACHE_KWARGS
from ..core.model import decoder_layers
from ..core.transform import ConfigError


def shipped_text(name: str = "prideprejudice") -> str:
    """The prose shipped with infertrix (``infertrix.eval.load_text`` once that lands)."""
    try:
        from ..eval import load_text  # type: ignore[attr-defined]

        return load_text(name)
    except ImportError:
        return (resources.files("infertrix") / "data" / f"{name}.txt").read_text(encoding="utf-8")


def find_tokenizer(model: nn.Module) -> tuple[Any | None, str]:
    """``(tokenizer, where it came from)``, or ``(None, why none was found)``."""
    from ..models import tokenizer_of

    tok = tokenizer_of(model)
    if tok is not None:
        return tok, "returned with the model by infertrix.models.load"
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None, "the model records no name_or_path to load its tokenizer from (built from a config?)"
    attempts: list[dict[str, str]] = [{}]
    folder = Path(str(path))
    if folder.is_dir():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:  # a GGUF folder: the tokenizer lives in the .gguf file
            attempts.append({"gguf_file": ggufs[0].name})
    failure = ""
    for kwargs in attempts:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), **kwargs), f"loaded from {path}"
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ImportError...: reported to the user
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None, f"no tokenizer loads from the model's name_or_path {str(path)!r} ({failure})"


def calibration_inputs(
    tokenizer, texts: Sequence[str] | str | None = None, num_samples: int = 8, seq_len: int = 256
) -> list[Tensor]:
    """``num_samples`` token windows [1, seq_len]; from the end of the shipped text by default."""
    if tokenizer is None:
        raise ConfigError(
            "calibration needs a tokenizer: pass tokenizer=... to the transform (or calibration_data= token ids)"
        )
    if texts is None:
        texts = [shipped_text()]
        from_end = True
    else:
        texts = [texts] if isinstance(texts, str) else list(texts)
        from_end = False
    ids = torch.cat([torch.as_tensor(tokenizer(t)["input_ids"], dtype=torch.long).flatten() for t in texts])
    need = num_samples * seq_len
    if ids.numel() < seq_len:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}; pass more text")
    ids = ids[-need:] if from_end else ids[:need]
    return [w.unsqueeze(0) for w in ids.split(seq_len) if w.numel() == seq_len]


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


class _Stop(Exception):
    pass


def _layer_output(out):
    return out[0] if isinstance(out, tuple | list) else out


# callback(layer_index or "lm_head", {name: linear}, {name: stats}) quantizes and swaps the layers
LayerCallback = Callable[[int | str, dict[str, nn.Module], dict[str, InputStats]], None]


@torch.no_grad()
def sequential_quantize(
    model: nn.Module,
    targets: dict[str, nn.Module],
    batches: list[Tensor],
    callback: LayerCallback,
    hessian: bool,
    lm_head_name: str | None = None,
    progress: bool = True,
) -> None:
    """Walk the decoder layers with calibration inputs, calling ``callback`` for each layer's targets."""
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
        for ids in batches:
            model(input_ids=ids, use_cache=False)
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
