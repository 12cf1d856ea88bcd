"""Quickstart: load the embedded SmolLM2, measure it, optimize it, describe and restore it.

    python examples/quickstart.py [recipe]      # e.g. "w4a8" once the quant family is installed
"""

import sys

import torch

import infertrix as ix
from infertrix import eval as ixe

torch.set_num_threads(2)
model, tok = ix.models.load("smollm2")
print(ix.ops.status())
print(f"perplexity before: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")

recipe = sys.argv[1] if len(sys.argv) > 1 else "baseline"
ix.optimize(model, recipe)
print(ix.describe(model))
print(f"perplexity after {recipe}: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")

prompt = tok("It is a truth universally acknowledged, that", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=30, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
print(ix.restore(model))
