"""Engine drafts (``speculative.lean``) compute what the draft model computes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core.transform import Applied, Stage, Transform
from infertrix.engine.linears import fuse as fuse_quantized
from infertrix.speculative.draft_model import DraftModelDrafter, _RaggedDraftKV
from infertrix.speculative.drafter import DraftContext
from infertrix.speculative.lean import EngineDraftKV, draft_runner, engine_draft_kv, lean_supported
from infertrix.speculative.quantized_self import quantized_copy


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _one_row(model) -> EngineDraftKV:
    kv = engine_draft_kv(model, 1, 0)
    assert kv is not None
    return kv


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_matches_the_model_step_by_step(arch):
    model = make_tiny(arch, num_key_value_heads=2, attention_bias=arch == "qwen2")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (29,), generator=g).tolist()
    ref = full_logits(model, ids)
    lean = _one_row(model)
    torch.testing.assert_close(lean.last_logits([ids[:11]])[0], ref[10], rtol=0, atol=2e-5)
    for i in range(11, 20):  # one token at a time
        torch.testing.assert_close(lean.last_logits([[ids[i]]])[0], ref[i], rtol=0, atol=2e-5)
    lean.rollback([15])  # roll back, then a window of several tokens
    assert int(lean.pos[0]) == 15 and lean.cache.get_seq_length() == 15
    torch.testing.assert_close(lean.last_logits([ids[15:29]])[0], ref[28], rtol=0, atol=2e-5)
    with pytest.raises(ValueError):
        lean.rollback([30])


@pytest.mark.parametrize("bits", [4, 8])
def test_lean_on_a_quantized_copy_matches_its_own_forward_and_fusion_shares_codes(bits):
    model = make_tiny("llama", hidden_size=64, intermediate_size=128, attention_bias=bits == 8)
    quant = (ix.quant.W4A8(group_size=32, quantize_lm_head=True, progress=False) if bits == 4
             else ix.quant.W8A8(smooth_alpha=None, quantize_lm_head=True, progress=False))
    draft, _ = quantized_copy(model, quant)
    ids = torch.randint(3, 128, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    before = full_logits(draft, ids)
    attn, mlp = draft.model.layers[0].self_attn, draft.model.layers[0].mlp
    assert attn.k_proj.qweight.untyped_storage().data_ptr() != attn.q_proj.qweight.untyped_storage().data_ptr()
    lean = _one_row(draft)
    assert draft_runner(draft) is lean.runner  # built once per draft
    assert attn.k_proj.qweight.data_ptr() != attn.q_proj.qweight.data_ptr()
    # q/k/v and gate/up are fused: the modules view one buffer each
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == attn.q_proj.qweight.untyped_storage().data_ptr()
    assert mlp.up_proj.qweight.untyped_storage().data_ptr() == mlp.gate_proj.qweight.untyped_storage().data_ptr()
    assert torch.equal(full_logits(draft, ids), before)  # the model's own forward is unchanged by fusion
    lean.last_logits([ids[:-1]])
    torch.testing.assert_close(lean.last_logits([ids[-1:]])[0], before[-1], rtol=0, atol=1e-4)


def test_fuse_refuses_what_it_cannot_fuse():
    a = ix.quant.W4A8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), 32)
    b = ix.quant.W4A8Linear.from_linear(torch.nn.Linear(64, 24, bias=False), 32)  # 24: not whole 16-row panels
    c = ix.quant.W4A8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), 64)  # another group size
    assert fuse_quantized([a, b]) is None and fuse_quantized([a, c]) is None
    assert fuse_quantized([torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)]) is None
    x = torch.randn(3, 64)
    ref = torch.cat([a(x), a(x)], -1)
    d = ix.quant.W4A8Linear.from_linear(torch.nn.Linear(64, 32, bias=False), 32)
    d.load_state_dict(a.state_dict())
    assert torch.equal(fuse_quantized([a, d])(x), ref)
    e = ix.quant.W8A8Linear.from_weight(torch.randint(-127, 128, (24, 64), dtype=torch.int8), torch.rand(24), None,
                                       torch.float32)
    assert fuse_quantized([a, e]) is None  # W4A8 with W8A8
    f = ix.quant.W8A8Linear.from_weight(torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40),
                                       torch.randn(40), torch.float32)
    assert fuse_quantized([e, f]) is None  # one with a bias, one without
    ref = torch.cat([e(x), e(x)], -1)  # W8A8 fuses at any output size; each row is computed as before
    g = ix.quant.W8A8Linear.from_weight(e.qweight.clone(), e.scale.clone(), None, torch.float32)
    assert torch.equal(fuse_quantized([e, g])(x), ref)


def test_unsupported_models_are_named():
    assert lean_supported(make_tiny("llama")) is None
    assert lean_supported(_sliding_mistral()) is None  # the engine runs sliding windows
    assert "bfloat16" in lean_supported(make_tiny("llama").to(torch.bfloat16))
    dynamic = make_tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "rotary scaling" in lean_supported(dynamic)
    assert engine_draft_kv(dynamic, 1, 0) is None


def _sliding_mistral():
    import transformers as tf
    from conftest import TINY_COMMON

    return tf.MistralForCausalLM(tf.MistralConfig(**TINY_COMMON, sliding_window=16)).eval()


def test_engine_draft_rows_equal_single_rows_across_rollbacks():
    """Rows of an engine draft advance by different amounts (re-aligned by re-feeding) and still
    compute each row's own logits, bit for bit."""
    model = make_tiny("qwen2", seed=4)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (17, 6, 11)]
    rows = engine_draft_kv(model, 3, 0)
    alone = [_one_row(model) for _ in seqs]
    feeds = [seqs[0][:9], seqs[1][:2], seqs[2][:5]]
    for step in range(4):
        got = rows.last_logits(feeds)
        for r, f in enumerate(feeds):
            if f:
                assert torch.equal(got[r], alone[r].last_logits([f])[0]), (step, r)
        keep = [max(0, int(rows.pos[r]) - (r + step) % 3) for r in range(3)]  # each row rolls back its own way
        rows.rollback(keep)
        for r in range(3):
            alone[r].rollback([keep[r]])
        feeds = [seqs[r][keep[r] : keep[r] + 1 + (r + step) % 2] if r != step % 3 else [] for r in range(3)]


def _ctx(batch):
    return DraftContext(do_sample=False, batch_size=batch, pad_token_id=0, warp=lambda x: x)


def test_drafter_uses_the_engine_and_times_single_token_forwards():
    draft = make_tiny("llama", seed=3)
    prompt = torch.randint(3, 128, (40,)).tolist()
    single = DraftModelDrafter(draft, 1, 0.0, False, 1)
    single.start(draft, _ctx(1))
    assert len(single.propose([prompt], [1]).tokens[0]) == 1
    assert single.token_seconds is None  # its only forward caught up on 40 tokens: not a draft token's cost
    one = DraftModelDrafter(draft, 3, 0.0, False, 3)
    one.start(draft, _ctx(1))
    assert isinstance(one.kv, EngineDraftKV) and one.path == "engine"
    tokens = one.propose([prompt], [3]).tokens[0]
    assert len(tokens) == 3
    assert one.token_seconds is not None  # from the two one-token forwards
    four = DraftModelDrafter(draft, 3, 0.0, False, 3)
    four.start(draft, _ctx(2))
    assert isinstance(four.kv, EngineDraftKV)
    # one row alone and in a batch draft the same greedy tokens
    assert four.propose([prompt, prompt[:20]], [3, 3]).tokens[0] == tokens
    with_context = DraftModelDrafter(draft, 3, 0.0, False, 3, context=lambda: torch.no_grad())
    with_context.start(draft, _ctx(1))
    assert isinstance(with_context.kv, _RaggedDraftKV)  # a context changes the model: its own forward
    assert with_context.path.startswith("module")


class _ScaleNorm(Transform):
    stage = Stage.WEIGHTS

    def apply(self, model):
        model.model.norm.weight.data.mul_(2.0)  # in place through .data: no version bump
        return Applied(self, undo=lambda: None)


def test_quantized_copy_refuses_a_quantizer_that_changes_shared_tensors():
    model = make_tiny("llama")
    with pytest.raises(RuntimeError, match="modified 1 of the model's own tensors"):
        quantized_copy(model, _ScaleNorm())
