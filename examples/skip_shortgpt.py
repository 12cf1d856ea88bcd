"""ShortGPT on SmolLM2: calibrate a plan, save it, measure it, and use it as a temporary draft.

    python examples/skip_shortgpt.py [--fraction 0.2]
"""

from __future__ import annotations

import argparse
import time

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import models
from infertrix.skip import ShortGPT, SkipPlan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.2, help="share of decoder compute to skip")
    ap.add_argument("--out", default="smollm2-shortgpt.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread decodes fastest on a busy shared machine

    model, tok = models.load("smollm2")
    t = time.perf_counter()
    plan = ShortGPT(fraction=args.fraction, tokenizer=tok).plan(model)  # progress bar while calibrating
    print(f"calibrated in {time.perf_counter() - t:.1f} s\n{plan}")
    plan.save(args.out)

    base = ixe.perplexity(model, tok, max_tokens=1024)
    ix.optimize(model, ix.skip.ApplySkipPlan(path=args.out))  # or: ix.optimize(model, "shortgpt:0.2")
    print(ix.describe(model))
    print(f"perplexity {base:.2f} -> {ixe.perplexity(model, tok, max_tokens=1024):.2f}")
    ix.restore(model)

    # temporarily, e.g. as a self-speculative draft: same weights, same cache layout
    prompt = tok("It is a truth universally acknowledged", return_tensors="pt")
    with SkipPlan.load(args.out).active(model):
        draft = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    full = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    print("draft:", tok.decode(draft[0]))
    print("full: ", tok.decode(full[0]))


if __name__ == "__main__":
    main()
