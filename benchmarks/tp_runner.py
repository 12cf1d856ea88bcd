"""Tensor-parallel side of benchmarks/scale.py, run under torchrun (gloo on CPU):

    torchrun --standalone --nproc-per-node 3 benchmarks/tp_runner.py FOLDER OUT.json RECIPE...

Loads FOLDER with ``tp_plan="auto"`` once, and for each recipe ("" = float) applies it, records the
greedy tokens of the shipped agreement prompts and the decode tokens/s at batch 1 and 16, then
restores. Rank 0 writes OUT.json; every rank's tokens are gathered so the file says whether they agree.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import infertrix as ix
from infertrix.eval.agreement import AGREEMENT_PROMPTS, greedy_tokens


def decode_rate(model, tok, batch: int, new_tokens: int) -> float:
    """Decode tokens/s (all rows) of greedy generation from a short prompt, prefill subtracted."""
    enc = tok([AGREEMENT_PROMPTS[0]] * batch, return_tensors="pt")
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=1, **kw)
    t1 = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens + 1, **kw)
    t2 = time.perf_counter()
    return batch * new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


def main(folder: str, out: str, recipes: list[str], new_tokens: int = 32) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")
    results = {}
    for recipe in recipes:
        if recipe:
            ix.optimize(model, recipe)
        tokens = greedy_tokens(model, tok, AGREEMENT_PROMPTS, max_new_tokens=new_tokens)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, tokens)
        rates = {b: decode_rate(model, tok, b, 16) for b in (1, 16)}
        results[recipe] = {"tokens": tokens, "ranks_agree": all(r == tokens for r in ranks), "tok_s": rates}
        if recipe:
            ix.restore(model)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"world": dist.get_world_size(), "threads": torch.get_num_threads(), "results": results}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
