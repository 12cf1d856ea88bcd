"""SnapKV on SmolLM2: answer a question about a long prompt with half the KV cache, in 4 bits.

python examples/kvcache_snapkv.py
"""

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import kvcache as kv
from infertrix.models import load

torch.set_num_threads(2)
model, tok = load("smollm2")
prompt = ixe.passkey_prompt(tok, context_tokens=1024, depth=0.3, key=48213)
inputs = tok(prompt, return_tensors="pt")


def answer() -> str:
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, inputs.input_ids.shape[1] :])


print("full cache:", answer())
ix.optimize(
    model, kv.SnapKV(compression=0.5), kv.KIVI(bits=4)
)  # evict half, store the rest in 4 bits
print("snapkv:0.5 + kivi:4:", answer())
print(ix.describe(model))  # kv_bytes vs kv_bytes_uncompressed of the last generate
ix.restore(model)
