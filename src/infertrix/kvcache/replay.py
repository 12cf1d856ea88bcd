"""Compress one recorded prefill under many policies: for sweeps and benchmarks.

A policy never changes the prefill itself: each layer attends to all prompt tokens and is compressed
only after its attention has run, so the hidden states of a prefill are the same under every policy.
``record_prefill`` runs it once with a plain ``DynamicCache`` and records each full-attention module's
inputs; ``replay`` then builds the cache a policy would have produced, by calling the very same
``update``, ``PolicyCache.after_attention`` and ``PolicyCache.after_forward`` steps the hooks call
during ``generate`` (``tests/kvcache/test_replay.py`` checks the result is identical to a real
prefill).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from ..core.generation import cache_argument_name
from ..core.model import decoder_layers
from .cache import EvictingLayer, full_attention_layers
from .kivi import KIVI
from .policy_cache import PolicyCache


@dataclass
class PrefillRecording:
    cache: DynamicCache
    logits: Tensor  # [B, V] logits of the last prompt position
    inputs: dict[int, tuple] = field(
        default_factory=dict
    )  # layer -> (hidden, position_embeddings, mask)
    # the forward's own inputs, for a policy's after_forward (KVzip re-reads the prompt from its ids)
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None


@torch.no_grad()
def record_prefill(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> PrefillRecording:
    """Run the prefill once with a plain cache and record what each full-attention module saw."""
    cache = DynamicCache(config=model.config)
    rec = PrefillRecording(cache, torch.empty(0), input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids)
    handles = []
    for i in full_attention_layers(model.config):
        attn = decoder_layers(model)[i].self_attn

        def hook(module, args, kwargs, output, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rec.inputs[i] = (
                hidden,
                kwargs.get("position_embeddings"),
                kwargs.get("attention_mask"),
            )

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        out = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_argument_name(model): cache},
            logits_to_keep=1,
        )
    finally:
        for h in handles:
            h.remove()
    rec.logits = out.logits[:, -1]
    return rec


@torch.no_grad()
def replay(
    model: nn.Module, rec: PrefillRecording, policy=None, quant: KIVI | None = None
) -> PolicyCache:
    """The cache ``policy`` (and ``quant``, a KIVI config) would hold after the recorded prefill."""
    cache = PolicyCache(model.config, policy=policy, quant=quant)
    cache.note_pads(rec.attention_mask, rec.input_ids.shape[1])  # as the model's forward hook does
    layers = decoder_layers(model)
    for i, layer in enumerate(cache.layers):
        src = rec.cache.layers[i]
        if not isinstance(layer, EvictingLayer):
            cache.layers[i] = copy.deepcopy(src)
            continue
        layer.update(src.keys, src.values)
        hidden, pos, mask = rec.inputs[i]
        cache.after_attention(layers[i].self_attn, i, hidden, pos, mask)
    cache.after_forward(model, rec.input_ids, rec.attention_mask, rec.position_ids)
    cache.forward_new = None  # as after a causal LM forward
    return cache
