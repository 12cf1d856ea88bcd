"""``infertrix`` command line: ``infertrix bench`` runs a baseline and recipes side by side.

    infertrix bench --model smollm2 --recipe baseline --recipe "w4a8" --json out.json --plot out.png

Every recipe is measured on a freshly loaded copy of the model with the same prompts: perplexity
on the shipped novel, greedy agreement with the baseline, prefill/decode tokens/s (threads
pinned, warm-up, median of repeats), peak resident memory, weight bytes; each figure is also
given as a ratio to the baseline row.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

AGREEMENT_PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The quickest way to learn a new language is",
    "Question: What is the capital of France?\nAnswer:",
]


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


def _measure(model, tok, recipe: str, args, reference: list[list[int]] | None) -> dict:
    from . import describe, optimize
    from . import eval as ixe

    row: dict = {"recipe": recipe}
    t = time.perf_counter()
    optimize(model, recipe)
    row["apply_s"] = time.perf_counter() - t
    d = describe(model)
    row["weight_MiB"] = d.bytes_now / 2**20
    with ixe.pinned_threads(args.threads):
        row["perplexity"] = ixe.perplexity(
            model, tok, max_tokens=args.ppl_tokens, window=args.ppl_window, progress=True
        )
        tokens = ixe.greedy_tokens(model, tok, AGREEMENT_PROMPTS, max_new_tokens=args.agree_tokens, progress=True)
    row["agreement"] = ixe.token_agreement(tokens, reference) if reference is not None else 1.0
    speed, peak = ixe.peak_rss(
        lambda: ixe.measure_speed(
            model, tok, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads
        )
    )
    row["prefill_tok_s"] = speed.prefill_tokens_per_s
    row["decode_tok_s"] = speed.decode_tokens_per_s
    row["peak_rss_MiB"] = peak / 2**20
    row["_tokens"] = tokens
    row["describe"] = d.to_dict()
    return row


def bench(args) -> list[dict]:
    from . import models

    recipes = _recipes(args)
    rows: list[dict] = []
    reference = None
    for recipe in tqdm(recipes, desc="recipes"):
        gc.collect()
        model, tok = models.load(args.model)
        try:
            row = _measure(model, tok, recipe, args, reference)
        except Exception as exc:  # noqa: BLE001 - one failing recipe must not hide the others
            if recipe == "baseline":
                raise
            row = {"recipe": recipe, "error": f"{type(exc).__name__}: {exc}"}
        if recipe == "baseline":
            reference = row["_tokens"]
        rows.append(row)
        del model
    base = rows[0]
    for r in rows:
        if "error" in r:
            continue
        r["ppl_ratio"] = r["perplexity"] / base["perplexity"]
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["memory_ratio"] = r["peak_rss_MiB"] / base["peak_rss_MiB"]
    return rows


COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("ppl_ratio", "ppl x", "{:.3f}"),
    ("agreement", "agree", "{:.1%}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("prefill_speedup", "prefill x", "{:.2f}"),
    ("peak_rss_MiB", "peak RSS MiB", "{:.0f}"),
    ("weight_MiB", "weights MiB", "{:.1f}"),
]


def format_table(rows: list[dict]) -> str:
    header = [c[1] for c in COLUMNS]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["recipe"], "error: " + r["error"]] + [""] * (len(COLUMNS) - 2))
            continue
        body.append([fmt.format(r[k]) if k in r else "" for k, _, fmt in COLUMNS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'infertrix[bench]'") from exc
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        ax.scatter(r["decode_speedup"], r["perplexity"])
        ax.annotate(r["recipe"], (r["decode_speedup"], r["perplexity"]), fontsize=8)
    ax.set_xlabel("decode speed-up over baseline (x)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("quality against speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


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
    sub.add_parser("status", help="show which kernel backend each op uses")
    sub.add_parser("list", help="list the registered transforms")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if getattr(args, "quick", False):
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 8, 1
        args.ppl_tokens, args.ppl_window, args.agree_tokens = 256, 128, 8
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
    rows = bench(args)
    table = format_table(rows)
    print(table)
    write_outputs(rows, args)
    return 0


def write_outputs(rows: list[dict], args: argparse.Namespace) -> None:
    """Write the --json and --plot files the arguments ask for."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        args.json.write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": clean}, indent=2, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
