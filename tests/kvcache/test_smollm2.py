"""The real SmolLM2: ratio 0 is bit-identical, compression halves the KV bytes, prefill logits unchanged."""

from __future__ import annotations

import pytest
import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import kvcache as kv


@pytest.mark.smollm2
def test_snapkv_on_smollm2(smollm2):
    model, tok = smollm2
    prompt = ixe.passkey_prompt(tok, context_tokens=300, depth=0.5, key=31415)
    enc = tok(prompt, return_tensors="pt")
    n = enc.input_ids.shape[1]

    def gen():
        out = model.generate(
            **enc,
            max_new_tokens=6,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=tok.eos_token_id,
        )
        return out.sequences[0, n:], torch.stack(out.logits, 1)

    ref_tokens, ref_logits = gen()  # transformers' own code: the module path
    try:
        ix.optimize(model)  # the engine alone (on by default)
        engine_tokens, engine_logits = gen()
        ix.restore(model)
        ix.optimize(model, kv.SnapKV(compression=0.0))  # the engine runs every forward: nothing to score
        tokens, logits = gen()
        assert torch.equal(tokens, engine_tokens) and torch.equal(logits, engine_logits)
        ix.restore(model)
        ix.optimize(model, kv.SnapKV(compression=0.5), kv.KIVI(bits=4), "engine(enabled=false)")
        tokens, logits = gen()
        # the prompt's own forward attends to every token: its logits (the first answer token) are unchanged
        assert torch.equal(logits[:, 0], ref_logits[:, 0])
        rep = next(t["report"] for t in ix.describe(model).transforms if "kv_bytes" in t["report"])
        assert rep["tokens_seen"] == n + 5
        # half the tokens; 4-bit codes (plus scales) for all but the 32-63 most recent full-precision
        # ones, whose append buffer also holds one group (32) of headroom: ~0.35 of the full cache here
        assert rep["kv_fraction"] < 0.36
    finally:
        ix.restore(model)
