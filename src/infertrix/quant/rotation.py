"""Offline rotation of the residual stream before quantization (QuaRot / SpinQuant's R1).

QuaRot (Ashkboos et al. 2024, https://arxiv.org/abs/2404.00456) and SpinQuant (Liu et al. 2024,
https://arxiv.org/abs/2405.16406) multiply the residual stream by an orthogonal matrix ``Q``:
outlier channels of the hidden states (and of the weights that read them) are spread over all
channels, so per-token int8 activations and int4 weight groups both lose less. For a pre-norm
decoder (hidden states as row vectors ``x``, rotated stream ``x Q``) the model is unchanged in
exact arithmetic once:

1. each RMSNorm's weight ``g`` is folded into the linear layers that read its output
   (``W <- W diag(g)``: q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``,
   ``lm_head`` after the final norm) and the norm's weight set to 1 (``rms(x Q) = rms(x)``, so a
   weightless RMSNorm commutes with ``Q``);
2. the token embedding becomes ``E Q``; every layer reading the stream ``W <- W Q``; every layer
   writing into it (``o_proj``, ``down_proj``) ``W <- Q^T W`` (and its bias ``b <- b Q``);
3. a tied ``lm_head`` is untied (it now differs from the embedding by the final norm and ``Q``).

``Q`` here is a seeded random orthogonal matrix (QR of a Gaussian, SpinQuant's random baseline;
QuaRot uses a randomised Hadamard matrix, which needs a Hadamard size; 576 = SmolLM2's width has
none of the easy constructions). The rotation is computed in float64 and costs nothing at run time;
the inputs of ``o_proj`` and ``down_proj`` are not rotated (QuaRot's online Hadamard transforms).
Supported: Llama-style decoders (Llama, Mistral, Qwen2/3, SmolLM2) whose norms multiply by their
weight; Gemma's ``1 + weight`` norms and sandwich norms are refused with a clear error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.model import decoder_layers
from ..core.transform import UnsupportedModelError
from ..linear.swap import ModuleSwapper, output_projection_name
from .calibration import final_norm

READERS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
           "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}
WRITERS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A seeded random orthogonal ``[n, n]`` matrix in float64 (Haar-distributed: QR with sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _check_norm(norm: nn.Module | None, where: str) -> nn.Module:
    if not isinstance(getattr(norm, "weight", None), nn.Parameter):
        raise UnsupportedModelError(f"rotate=True needs an RMSNorm with a weight at {where}; this model has none")
    if "gemma" in type(norm).__name__.lower() or getattr(norm, "bias", None) is not None:
        raise UnsupportedModelError(
            f"rotate=True supports RMSNorms that multiply by their weight (Llama, Mistral, Qwen); {where} is "
            f"{type(norm).__name__}"
        )
    return norm


def check_rotatable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless the model has the pre-norm layout rotation needs."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        raise UnsupportedModelError("rotate=True needs an nn.Embedding input embedding")
    if output_projection_name(model) is None:
        raise UnsupportedModelError("rotate=True needs an output projection (lm_head)")
    _check_norm(final_norm(model), "the final norm")
    for i, layer in enumerate(decoder_layers(model)):
        if any(hasattr(layer, n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
            raise UnsupportedModelError(f"rotate=True: layer {i} has sandwich norms (Gemma 2/3), not supported")
        for norm_name in READERS:
            _check_norm(getattr(layer, norm_name, None), f"layer {i}.{norm_name}")
        linears = [(block, n) for block, names in READERS.values() for n in names] + list(WRITERS)
        for block, n in linears:
            if not isinstance(getattr(getattr(layer, block, None), n, None), nn.Linear):
                raise UnsupportedModelError(f"rotate=True: layer {i} has no nn.Linear {block}.{n}")


@torch.no_grad()
def rotate_residual(model: nn.Module, swapper: ModuleSwapper, seed: int = 0) -> Tensor:
    """Rotate ``model``'s residual stream in place (see the module docstring); returns ``Q``.

    Every parameter changed is saved through ``swapper`` first, and a tied ``lm_head`` is swapped
    for an untied copy, so ``swapper.undo()`` brings the original model back exactly.
    """
    check_rotatable(model)
    emb = model.get_input_embeddings()
    head_name = output_projection_name(model)
    head = model.get_submodule(head_name)
    q = random_orthogonal(emb.weight.shape[1], seed)

    def update(param: nn.Parameter, new: Tensor) -> None:
        swapper.save_param(param)
        param.copy_(new.to(param.dtype))

    def read(lin: nn.Linear, g: Tensor) -> None:  # W <- W diag(g) Q
        update(lin.weight, (lin.weight.double() * g[None, :]) @ q)

    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           dtype=head.weight.dtype, device=head.weight.device)
        untied.weight.copy_(head.weight)
        if head.bias is not None:
            untied.bias.copy_(head.bias)
        swapper.swap(head_name, untied)
        head = untied
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            swapper.save_attr(config, "tie_word_embeddings")
            config.tie_word_embeddings = False
    update(emb.weight, emb.weight.double() @ q)
    for layer in decoder_layers(model):
        for norm_name, (block, names) in READERS.items():
            norm = getattr(layer, norm_name)
            g = norm.weight.double()
            for n in names:
                read(getattr(getattr(layer, block), n), g)
            update(norm.weight, torch.ones_like(norm.weight))
        for block, n in WRITERS:  # W <- Q^T W, b <- b Q
            lin = getattr(getattr(layer, block), n)
            update(lin.weight, q.t() @ lin.weight.double())
            if lin.bias is not None:
                update(lin.bias, lin.bias.double() @ q)
    norm = final_norm(model)
    read(head, norm.weight.double())
    update(norm.weight, torch.ones_like(norm.weight))
    return q
