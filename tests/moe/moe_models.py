"""Tiny randomly initialised MoE models of each architecture ExpertOffload claims."""

from __future__ import annotations

import pytest
import torch

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    num_experts_per_tok=2,
)


def make_moe(arch: str, seed: int = 0, experts: int = 8, implementation: str | None = None, **overrides):
    """A tiny random MoE causal LM in eval mode (``implementation``: experts_implementation)."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(COMMON, **overrides)
    if arch == "mixtral":
        kw.setdefault("intermediate_size", 96)
        cfg = tf.MixtralConfig(**kw, num_local_experts=experts)
        cls = tf.MixtralForCausalLM
    elif arch == "qwen2_moe":
        kw.setdefault("intermediate_size", 96)
        kw.setdefault("moe_intermediate_size", 48)
        cfg = tf.Qwen2MoeConfig(
            **kw, shared_expert_intermediate_size=64,
            num_experts=experts, decoder_sparse_step=1, norm_topk_prob=False,
        )
        cls = tf.Qwen2MoeForCausalLM
    elif arch == "qwen3_moe":
        kw.setdefault("intermediate_size", 96)
        kw.setdefault("moe_intermediate_size", 48)
        cfg = tf.Qwen3MoeConfig(
            **kw, num_experts=experts, head_dim=16,
            decoder_sparse_step=1, norm_topk_prob=True,
        )
        cls = tf.Qwen3MoeForCausalLM
    elif arch == "olmoe":
        kw.setdefault("intermediate_size", 48)
        cfg = tf.OlmoeConfig(**kw, num_experts=experts)
        cls = tf.OlmoeForCausalLM
    else:
        raise ValueError(arch)
    if implementation is not None:
        cfg._experts_implementation = implementation
    model = cls(cfg).eval()
    # random routers are near-uniform; sharpen them so routing is decisive, as in trained models
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "weight"):
                gate.weight.mul_(8.0)
    return model


@pytest.fixture(params=MOE_ARCHS)
def moe_model(request):
    return make_moe(request.param)
