"""Run under ``torchrun --nproc-per-node 2``: each recipe on a tensor-parallel copy of a model and on
a single-process copy, greedy tokens written as JSON by rank 0 (tests/core/test_tensor_parallel.py)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import infertrix as ix


def transforms(recipe: str, draft: str) -> list:
    """The recipe's transforms; ``draft_model`` drafts with the small model saved in ``draft``
    (loaded in one process on every rank)."""
    rest, _, last = recipe.rpartition(",")
    if last != "draft_model":
        return [recipe]
    model = AutoModelForCausalLM.from_pretrained(draft)
    return [rest, ix.speculative.DraftModel(draft=model, adaptive=False)] if rest else [
        ix.speculative.DraftModel(draft=model, adaptive=False)]


def main(folder: str, draft: str, out: str, recipes: list[str]) -> None:
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 40))
    ids = torch.cat([prompt, prompt[:, :20]], 1)  # a repeat: prompt lookup finds drafts
    sharded = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")
    sharded.generation_config.eos_token_id = None  # a random model: compare whole continuations
    results = {}
    for recipe in recipes:
        single = AutoModelForCausalLM.from_pretrained(folder)
        single.generation_config.eos_token_id = None
        ix.optimize(single, *transforms(recipe, draft))
        ix.optimize(sharded, *transforms(recipe, draft))
        with torch.no_grad():
            logits = sharded(ids).logits - single(ids).logits
        got = sharded.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:].tolist()
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, got)
        want = single.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:].tolist()
        results[recipe] = {"want": want, "ranks": ranks, "max_logit_diff": logits.abs().max().item()}
        ix.restore(sharded)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
