"""ExpertOffload composes with the other families: the real W4A8 transform on the non-expert
linears and a real KV-cache policy. Offloading must not change what those transforms compute:
outputs equal the same transforms applied to the fully loaded model (greedy tokens, logits to 1e-5)."""

from __future__ import annotations

import pytest
import torch
from moe_models import make_moe

import infertrix as ix
from infertrix.kvcache import SnapKV
from infertrix.moe import ExpertOffload, offload_runtime
from infertrix.quant import W4A8, W4A8Linear

PROMPT = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(3))


def _greedy(model, new_tokens: int = 8):
    out = model.generate(PROMPT, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def _assert_same(model, ref_seq, ref_logits):
    seq, logits = _greedy(model)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_offload_composes_with_w4a8(arch):
    plain = make_moe(arch)
    plain_seq, plain_logits = _greedy(plain)
    ref = make_moe(arch)
    ix.optimize(ref, W4A8(group_size=32))
    ref_seq, ref_logits = _greedy(ref)
    assert (ref_logits - plain_logits).abs().max() > 1e-3  # the quantization really changes the outputs

    model = make_moe(arch)
    ix.optimize(model, W4A8(group_size=32), ExpertOffload(budget=0.25, prefetch=True))
    quantized = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    assert len(quantized) == len([m for m in ref.modules() if isinstance(m, W4A8Linear)]) > 0
    _assert_same(model, ref_seq, ref_logits)
    st = offload_runtime(model).cache.stats()
    assert st.misses > 0  # the experts really came from the store
    names = [e["name"] for e in ix.describe(model).transforms]
    assert any("w4a8" in n for n in names) and any("offload" in n for n in names)
    ix.restore(model)  # both undone: the plain model again
    seq, logits = _greedy(model)
    assert torch.equal(seq, plain_seq)
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_offload_composes_with_kv_policy(arch):
    policy = dict(window_size=4, compression=0.5)
    plain = make_moe(arch)
    _, plain_logits = _greedy(plain)
    ref = make_moe(arch)
    ix.optimize(ref, SnapKV(**policy))
    ref_seq, ref_logits = _greedy(ref)
    assert (ref_logits - plain_logits).abs().max() > 1e-4  # half the prompt's KV really evicted

    model = make_moe(arch)
    ix.optimize(model, ExpertOffload(budget=0.25, prefetch=True), SnapKV(**policy))
    _assert_same(model, ref_seq, ref_logits)
    assert offload_runtime(model).cache.stats().misses > 0


def test_offload_composes_with_w4a8_and_kv_policy():
    ref = make_moe("qwen2_moe")
    ix.optimize(ref, W4A8(group_size=32), SnapKV(window_size=4, compression=0.5))
    ref_seq, ref_logits = _greedy(ref)
    model = make_moe("qwen2_moe")
    ix.optimize(model, "w4a8:32", "offload:0.25(miss_policy=auto)", "snapkv:0.5(window_size=4)")
    _assert_same(model, ref_seq, ref_logits)
