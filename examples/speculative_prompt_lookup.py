"""Prompt-lookup speculative decoding on SmolLM2: same greedy output, fewer forward passes.

    python examples/speculative_prompt_lookup.py
"""

from __future__ import annotations

import time

import torch

import infertrix as ix
from infertrix import eval as ixe


def main() -> None:
    torch.set_num_threads(2)
    model, tok = ix.models.load("smollm2")
    text = ixe.text.body_text()
    start = text.find("It is a truth universally")
    passage = text[start : start + 600]
    chat = [{"role": "user", "content": "Rewrite the following passage in the present tense:\n\n" + passage}]
    inputs = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), return_tensors="pt")

    t0 = time.perf_counter()
    plain = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    t_plain = time.perf_counter() - t0

    ix.optimize(model, ix.speculative.PromptLookup(num_tokens=10))
    t0 = time.perf_counter()
    fast = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    t_fast = time.perf_counter() - t0

    print(tok.decode(fast[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    print(f"\nidentical to plain generate: {torch.equal(plain, fast)}")
    print(f"plain {t_plain:.2f} s, prompt lookup {t_fast:.2f} s")
    print(ix.describe(model))
    ix.restore(model)


if __name__ == "__main__":
    main()
