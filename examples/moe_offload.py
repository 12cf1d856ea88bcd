"""Run an MoE model with a quarter of its experts in memory, and show what the cache did.

    python examples/moe_offload.py                  # a small random Mixtral, built here
    python examples/moe_offload.py --checkpoint DIR # any Mixtral / Qwen-MoE / OLMoE safetensors folder

With --checkpoint the experts are never all in memory: the store is written straight from the
checkpoint, one expert at a time (infertrix.moe.load_offloaded).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import infertrix as ix
from infertrix.moe import ExpertOffload, load_offloaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="a transformers MoE checkpoint folder")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of experts kept in memory")
    args = ap.parse_args()
    ids = torch.tensor([[1, 15, 27, 99, 4, 8, 15, 16, 23, 42]])
    offload = ExpertOffload(budget=args.budget, policy="lru", prefetch=True)

    if args.checkpoint:
        offload.store_dir = tempfile.mkdtemp(prefix="experts-")
        model = load_offloaded(args.checkpoint, offload)
        reference = None
    else:
        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg).eval()
        reference = model.generate(ids, max_new_tokens=20, do_sample=False)
        ix.optimize(model, offload)  # or ix.optimize(model, "offload:0.25")

    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    print("tokens:", out[0, ids.shape[1]:].tolist())
    if reference is not None:
        print("identical to the fully loaded model:", torch.equal(out, reference))
    print(ix.describe(model))
    ix.restore(model)  # experts read back from the store; the prefetch thread stops


if __name__ == "__main__":
    main()
