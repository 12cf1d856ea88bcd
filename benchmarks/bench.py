"""The main job's table in BENCHMARKS.md: `infertrix bench` on SmolLM2, baseline and recipes.

    python -m benchmarks.bench --recipe baseline --all-recipes [any other `infertrix bench` flag]
"""

from __future__ import annotations

import sys

import torch

from benchmarks.report import write_section
from infertrix import cli


def main(argv: list[str]) -> None:
    args = cli.parse_args(["bench", "--model", "smollm2", *argv])
    rows = cli.bench(args)
    table = cli.format_table(rows)
    print(table)
    cli.write_outputs(rows, args)
    settings = (
        f"Perplexity: {args.ppl_tokens} tokens of *Pride and Prejudice* in {args.ppl_window}-token windows. "
        f"Agreement: greedy tokens equal to the baseline's over {len(cli.AGREEMENT_PROMPTS)} prompts x "
        f"{args.agree_tokens} tokens. Speed: greedy generate, {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens, batch 1, {args.threads} threads, median of {args.repeats}. "
        "Peak RSS: the whole process during the speed runs (it only grows across rows). Perplexity scores full windows without a cache, so KV-cache policies leave it unchanged: see the kvcache section for their quality."
    )
    write_section("bench", "infertrix bench: SmolLM2-135M-Instruct, baseline and recipes", settings + "\n\n" + table + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1:])
