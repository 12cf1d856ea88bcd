"""Run an MoE model with a quarter of its experts in memory, and show what the cache did.

    python examples/moe_offload.py                  # a small random Mixtral, built here
    python examples/moe_offload.py --checkpoint DIR # any Mixtral / Qwen-MoE / OLMoE safetensors folder
    python examples/moe_offload.py --expert-bits 4  # experts stored, moved and computed in int4 (lossy)
    python examples/moe_offload.py --expert-bits 4 --gptq --int8-layers 1
        # int4 experts quantized by GPTQ from the tokens routed to each (calibration text), the one
        # layer whose int4 experts cost the most kept in int8 (EdgeMoE's bit widths by importance)

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
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the float experts' bytes kept in memory")
    ap.add_argument("--expert-bits", type=int, choices=(4, 8),
                    help="low-bit experts (EdgeMoE): the same bytes then hold 4x (int8) or ~7x (int4) as many")
    ap.add_argument("--gptq", action="store_true", help="quantize the low-bit experts by GPTQ from their routed tokens")
    ap.add_argument("--int8-layers", type=int, default=0, help="with --expert-bits 4: layers whose experts stay int8")
    args = ap.parse_args()
    ids = torch.tensor([[1, 15, 27, 99, 4, 8, 15, 16, 23, 42]])
    # calibration ids: a random model has no tokenizer (a real one uses its own on the shipped text)
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    offload = ExpertOffload(budget=args.budget, policy="lru", prefetch=True, expert_bits=args.expert_bits,
                            expert_gptq=args.gptq, int8_layers=args.int8_layers,
                            calibration_ids=calib if args.gptq or args.int8_layers else None)

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
    if reference is not None and args.expert_bits is None:
        print("identical to the fully loaded model:", torch.equal(out, reference))
    elif reference is not None:  # lossy: compare with the float model's tokens
        same = (out[0, ids.shape[1]:] == reference[0, ids.shape[1]:]).float().mean().item()
        print(f"int{args.expert_bits} experts: {same:.0%} of the float model's greedy tokens (random weights: a rough sign only)")
    print(ix.describe(model))
    ix.restore(model)  # experts read back from the store; the prefetch thread stops


if __name__ == "__main__":
    main()
