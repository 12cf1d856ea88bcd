"""Compress a long context once, before any question, then ask two questions on the same half-size cache.

python examples/kvcache_question_agnostic.py

GlobalKVzip scores the context by having the model re-read it (KVzip, query-agnostic), so the kept half
serves questions it has not seen; the questions are kept whole (``prefill_min_tokens`` above their
length). RULER's question-agnostic protocol is this use: docs/kvcache.md, "RULER".
"""

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import kvcache as kv
from infertrix.eval.passkey import QUESTION
from infertrix.models import load

torch.set_num_threads(2)
model, tok = load("smollm2")
context = ixe.passkey_prompt(tok, context_tokens=1024, depth=0.5, key=48213).removesuffix(QUESTION)
questions = [QUESTION, "\nSay the pass key again. The pass key is"]

ids = tok(context + QUESTION, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
print("full cache:", repr(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))

ix.optimize(model, kv.GlobalKVzip(compression=0.5, prefill_min_tokens=256, tokenizer=tok))
cache = kv.new_cache(model)
seen = tok(context, return_tensors="pt").input_ids
with torch.no_grad():
    model(seen, cache=cache)  # the context alone: compressed here, before any question
print(f"context: {seen.shape[1]} tokens, {cache.kv_bytes() / 2**20:.2f} MiB of KV kept "
      f"({min(cache.stored_lengths())}..{max(cache.stored_lengths())} tokens per layer)")
for q in questions:
    ids = torch.cat([seen, tok(q, return_tensors="pt", add_special_tokens=False).input_ids], dim=1)
    out = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    print(repr(q.strip()), "->", repr(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    seen = out  # the next turn continues the tokens this cache has seen
print(ix.describe(model))
ix.restore(model)
