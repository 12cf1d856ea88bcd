"""``infertrix`` command line: ``infertrix bench`` runs a baseline and recipes side by side.

    infertrix bench --model smollm2 --recipe baseline --recipe "w4a8" --json out.json --plot out.png
    infertrix list        # the transforms, their aliases and recipe ':value' fields
    infertrix status      # which kernel backend each op uses

Every recipe is measured on a freshly loaded copy of the model with the same prompts: perplexity
on the shipped novel, greedy agreement with the baseline, prefill/decode tokens/s (threads
pinned, warm-up, median of repeats), peak resident memory, weight bytes; each figure is also
given as a ratio to the baseline row. Every recipe is parsed and its transforms constructed
(validated) before any model is loaded.

Building the parser imports neither torch nor transformers (``--help`` and ``--version`` answer
at once); the commands import what they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import textwrap
import time
from pathlib import Path

from . import __version__

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
    from tqdm.auto import tqdm

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


# --quick: small settings for a smoke run; options given explicitly still win.
QUICK = {"prompt_tokens": 32, "new_tokens": 8, "repeats": 1, "ppl_tokens": 256, "ppl_window": 128, "agree_tokens": 8}

BENCH_EPILOG = """\
recipes: transforms joined by commas, each 'name', 'name:value' or 'name(key=value, ...)',
e.g. "w4a8,snapkv:0.5,pld"; 'infertrix list' shows the names and ':value' fields.

exit status: 0 every row ran; 1 a recipe failed while running (its row shows the error, the
other rows are still printed and written); 2 bad arguments, or a recipe that does not parse,
validate or combine (checked before any model is loaded)."""


def build_parser(quick: bool = False) -> argparse.ArgumentParser:
    """The ``infertrix`` argument parser; building it imports neither torch nor transformers.

    ``quick``: bench's defaults are the ``--quick`` settings (explicit options still win).
    """
    parser = argparse.ArgumentParser(
        prog="infertrix",
        description="Inference-optimization transforms for transformers models: benchmark "
        "recipes against a baseline, list the transforms, show the kernel backends.",
        epilog="'infertrix list' shows every transform and the recipe syntax.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,list,status}")
    b = sub.add_parser(
        "bench",
        help="measure a baseline and recipes side by side on one model",
        description="Measure a baseline and recipes side by side on one model (a freshly loaded\n"
        "copy per row) and print one table.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--model", default="smollm2", help="'smollm2' (the embedded SmolLM2-135M-Instruct) or a transformers folder / hub id (default: %(default)s)")
    b.add_argument("--recipe", action="append", metavar="RECIPE", help="a recipe string; repeat for several rows; the 'baseline' row always runs first (default: only the baseline)")
    b.add_argument("--all-recipes", action="store_true", help="also run every registered transform with its default bench recipe (default: off)")
    b.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON here (default: not written)")
    b.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of perplexity against decode speed-up here; needs matplotlib (default: not written)")
    b.add_argument("--threads", type=int, metavar="N", help="torch threads while measuring (default: torch's own setting, i.e. OMP_NUM_THREADS or the core count)")
    b.add_argument("--prompt-tokens", type=int, default=256, metavar="N", help="prompt length of the speed runs (default: %(default)s)")
    b.add_argument("--new-tokens", type=int, default=64, metavar="N", help="tokens generated per speed run (default: %(default)s)")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="speed runs per row after one warm-up; the median is reported (default: %(default)s)")
    b.add_argument("--ppl-tokens", type=int, default=4096, metavar="N", help="tokens of prose scored for perplexity (default: %(default)s)")
    b.add_argument("--ppl-window", type=int, default=512, metavar="N", help="length of the independent windows perplexity is scored in (default: %(default)s)")
    b.add_argument("--agree-tokens", type=int, default=64, metavar="N", help="greedy tokens compared with the baseline per prompt (default: %(default)s)")
    quick_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    b.add_argument("--quick", action="store_true", help=f"small settings for a smoke run: {quick_flags}; options given explicitly still win (default: off)")
    if quick:
        b.set_defaults(**QUICK)
    sub.add_parser("list", help="list the transforms: aliases, recipe ':value' field and default, summary")
    sub.add_parser("status", help="show which kernel backend each op uses")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; for ``bench``, also resolve --threads and validate every recipe.

    A recipe that does not parse, whose transforms refuse their fields or conflict is an argument
    error (exit status 2) before any model is loaded, so a typo costs no baseline run.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "bench":
        return args
    if args.quick:
        parser = build_parser(quick=True)
        args = parser.parse_args(argv)
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    problems = recipe_problems(_recipes(args))
    if problems:
        parser.error("invalid recipe(s), nothing was run:\n  " + "\n  ".join(problems))
    return args


def recipe_problems(recipes: list[str]) -> list[str]:
    """One line per recipe that does not parse, whose transforms reject their fields, or that
    combines conflicting transforms (two cache policies, say); needs no model."""
    from . import parse_recipe
    from .core.api import _check_conflicts

    problems = []
    for recipe in recipes:
        try:
            _check_conflicts([], parse_recipe(recipe))
        except (ValueError, TypeError) as exc:  # ConfigError and ConflictError are ValueErrors
            problems.append(f"{recipe!r}: {exc}")
    return problems


def _first_sentence(doc: str | None) -> str:
    """The docstring's first sentence as plain text (reST markup removed)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?([^`]+)`", r"\1", para).replace("``", "")
    match = re.search(r"[.!?](?=\s+[A-Z(\"]|$)", para)
    return para[: match.end()] if match else para


def _value_field(cls: type) -> str:
    """How a recipe sets the transform's primary field: ``name:<field=default>``."""
    if cls.primary is None:
        return cls.name
    field = next(f for f in dataclasses.fields(cls) if f.name == cls.primary)
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    return f"{cls.name}:<{cls.primary}>" if default is None else f"{cls.name}:<{cls.primary}={default}>"


def format_transform_list(width: int = 100) -> str:
    """``infertrix list``: every transform by stage, with aliases, ':value' field and summary."""
    from . import available

    by_stage: dict = {}
    for name, cls in sorted(available().items()):
        if not name.startswith("_"):
            by_stage.setdefault(cls.stage, []).append(cls)
    heads = {
        cls: "  " + cls.name + (f" ({'aliases' if len(cls.aliases) > 1 else 'alias'} {', '.join(cls.aliases)})" if cls.aliases else "")
        for group in by_stage.values()
        for cls in group
    }
    column = min(max(map(len, heads.values())) + 2, width // 2)
    lines = []
    for stage in sorted(by_stage):
        lines.append(f"{stage.name.lower()}:")
        for cls in by_stage[stage]:
            head, recipe = heads[cls], _value_field(cls)
            fits = len(head) + 2 <= column and column + len(recipe) <= width
            lines.append(head.ljust(column) + recipe if fits else head + "\n" + " " * column + recipe)
            lines += textwrap.wrap(_first_sentence(cls.__doc__), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines.append("")
    lines.append(
        textwrap.fill(
            "Recipes join transforms with commas: 'name', 'name:value' (sets the field shown in <>) "
            "or 'name(key=value, ...)' for any field; e.g. infertrix bench --recipe \"w4a8,snapkv:0.5,pld\".",
            width,
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the ``infertrix`` command line; returns the exit status (see ``bench --help``)."""
    args = parse_args(argv)

    if args.command == "status":
        from . import ops

        print(ops.status())
        return 0
    if args.command == "list":
        print(format_transform_list())
        return 0
    rows = bench(args)
    table = format_table(rows)
    print(table)
    write_outputs(rows, args)
    failed = [r["recipe"] for r in rows if "error" in r]
    if failed:
        print(f"infertrix bench: {len(failed)} recipe(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
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
