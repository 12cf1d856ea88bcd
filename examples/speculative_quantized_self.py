"""Quantized self-speculation on SmolLM2: the model's own W8A8 copy drafts, the float model verifies.

    python examples/speculative_quantized_self.py

Works on open-ended prompts (no second model needed); greedy output is the plain model's.
"""

from __future__ import annotations

import time

import torch

import infertrix as ix


def main() -> None:
    torch.set_num_threads(2)
    model, tok = ix.models.load("smollm2")
    chat = [{"role": "user", "content": "What causes the seasons on Earth? Explain clearly."}]
    inputs = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), return_tensors="pt")

    t0 = time.perf_counter()
    plain = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    t_plain = time.perf_counter() - t0

    # weight_bits=4 drafts with a W4A8 copy instead: half the draft's cost, accepted less often
    ix.optimize(model, ix.speculative.QuantizedSelf())
    model.generate(**inputs, max_new_tokens=16, do_sample=False)  # warm-up: the draft and its fused layers
    t0 = time.perf_counter()
    fast = model.generate(**inputs, max_new_tokens=128, do_sample=False)
    t_fast = time.perf_counter() - t0

    print(tok.decode(fast[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    print(f"\nidentical to plain generate: {torch.equal(plain, fast)}")
    print(f"plain {t_plain:.2f} s, quantized self-draft {t_fast:.2f} s")
    print(ix.speculative.speculative_stats(model).last)
    print(ix.describe(model))
    ix.restore(model)


if __name__ == "__main__":
    main()
