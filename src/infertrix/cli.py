"""``infertrix`` command line: ``infertrix bench`` runs a baseline and recipes side by side.

    infertrix bench --model smollm2 --recipe baseline --recipe "w4a8" --json out.json --plot out.png

Each recipe is measured on the workload of its family (:mod:`infertrix.eval.workloads`): quant and
skip on perplexity, agreement with the baseline and decode speed; KV-cache policies at a long
prompt (passkey retrieval, KV bytes, decode speed there); speculative decoding on copy-heavy and
open prompts against plain ``generate``. One markdown table per family, each figure also given as
a ratio to the baseline measured on the same workload.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .eval import workloads


def _recipes(args) -> list[str]:
    from . import available

    recipes = list(args.recipe or [])
    if args.all_recipes:
        for name, cls in sorted(available().items()):
            if name.startswith("_") or getattr(cls, "bench_recipe", name) is None:
                continue
            recipe = getattr(cls, "bench_recipe", name)
            if recipe not in recipes:
                recipes.append(recipe)
    if not recipes or recipes[0] != "baseline":
        recipes = ["baseline"] + [r for r in recipes if r != "baseline"]
    return recipes


def bench(args: argparse.Namespace) -> workloads.MainJobReport:
    """Run the main job: the baseline and the recipes, each family on its workload
    (:func:`infertrix.eval.workloads.run_main_job`)."""
    return workloads.run_main_job(args.model, _recipes(args), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infertrix", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="measure a baseline and recipes side by side on one model")
    b.add_argument("--model", default="smollm2", help="'smollm2' or a transformers folder / hub id")
    b.add_argument("--recipe", action="append", help="a recipe string; repeat for several ('baseline' is added first)")
    b.add_argument("--all-recipes", action="store_true", help="also run every registered transform with its defaults")
    b.add_argument("--json", type=Path, help="write the rows as JSON here")
    b.add_argument("--plot", type=Path, help="write a plot of perplexity against decode speed-up here (PNG)")
    b.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads while timing")
    b.add_argument("--prompt-tokens", type=int, default=256)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of prose scored for perplexity")
    b.add_argument("--ppl-window", type=int, default=512)
    b.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared with the baseline per prompt")
    b.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    workloads.add_arguments(b)
    sub.add_parser("status", help="show which kernel backend each op uses")
    sub.add_parser("list", help="list the registered transforms")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if getattr(args, "quick", False):
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 8, 1
        args.ppl_tokens, args.ppl_window, args.agree_tokens = 256, 128, 8
        workloads.apply_quick(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.command == "status":
        from . import ops

        print(ops.status())
        return 0
    if args.command == "list":
        from . import available

        for name, cls in sorted(available().items()):
            if not name.startswith("_"):
                doc = (cls.__doc__ or "").strip().split("\n")[0]
                print(f"{name:20s} [{cls.stage.name.lower()}] {doc}")
        return 0
    report = bench(args)
    print(workloads.format_report(report))
    workloads.write_outputs(report, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
