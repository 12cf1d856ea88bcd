"""``infertrix`` command line: ``infertrix bench`` runs a baseline and recipes side by side.

    infertrix bench --model smollm2 --recipe baseline --recipe "w4a8" --json out.json --plot out.png
    infertrix list        # the transforms, their aliases and recipe ':value' fields
    infertrix status      # which kernel backend each op uses

Each recipe is measured on the workload of its family (:mod:`infertrix.eval.workloads`): quant and
skip on perplexity, agreement with the baseline and decode speed; KV-cache policies at a long
prompt (passkey retrieval, KV bytes, decode speed there); speculative decoding on copy-heavy and
open prompts against plain ``generate``. One markdown table per family, each figure also given as
a ratio to the baseline measured on the same workload. Every recipe is parsed and its transforms
constructed (validated) before any model is loaded.

Building the parser imports neither torch nor transformers (``--help`` and ``--version`` answer
at once); the commands import what they need.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import textwrap
from pathlib import Path

from . import __version__


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


def bench(args: argparse.Namespace):
    """Run the main job: the baseline and the recipes, each family on its workload
    (:func:`infertrix.eval.workloads.run_main_job`); returns its report."""
    from .eval import workloads

    return workloads.run_main_job(args.model, _recipes(args), args)


# --quick: small settings for a smoke run; options given explicitly still win.
QUICK = {"prompt_tokens": 32, "new_tokens": 8, "repeats": 1, "ppl_tokens": 256, "ppl_window": 128, "agree_tokens": 8,
         "kv_context": 512, "kv_trials": 2, "kv_decode_steps": 4, "kv_decode_rounds": 1,
         "spec_new_tokens": 16, "spec_repeats": 1, "spec_warmup_tokens": 8}

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
    b.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG of quality against speed, one panel per family, here; needs matplotlib (default: not written)")
    b.add_argument("--threads", type=int, metavar="N", help="torch threads while measuring (default: torch's own setting, i.e. OMP_NUM_THREADS or the core count)")
    b.add_argument("--prompt-tokens", type=int, default=256, metavar="N", help="prompt length of the speed runs (default: %(default)s)")
    b.add_argument("--new-tokens", type=int, default=64, metavar="N", help="tokens generated per speed run (default: %(default)s)")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="speed runs per row after one warm-up; the median is reported (default: %(default)s)")
    b.add_argument("--ppl-tokens", type=int, default=4096, metavar="N", help="tokens of prose scored for perplexity (default: %(default)s)")
    b.add_argument("--ppl-window", type=int, default=512, metavar="N", help="length of the independent windows perplexity is scored in (default: %(default)s)")
    b.add_argument("--agree-tokens", type=int, default=64, metavar="N", help="greedy tokens compared with the baseline per prompt (default: %(default)s)")
    g = b.add_argument_group("workloads (kvcache and speculative families)")
    g.add_argument("--kv-context", type=int, default=2048, metavar="N", help="prompt tokens of the KV-cache workload (default: %(default)s)")
    g.add_argument("--kv-trials", type=int, default=10, metavar="N", help="passkey trials at --kv-context (default: %(default)s)")
    g.add_argument("--kv-decode-steps", type=int, default=12, metavar="N", help="decode steps per round timed at --kv-context (default: %(default)s)")
    g.add_argument("--kv-decode-rounds", type=int, default=3, metavar="N", help="interleaved rounds of those steps (default: %(default)s)")
    g.add_argument("--spec-prompts", nargs="+", default=["rewrite", "story"], metavar="KIND",
                   help="prompt kinds of the speculative workload: rewrite (copy-heavy), story, question (open) (default: %(default)s)")
    g.add_argument("--spec-new-tokens", type=int, default=128, metavar="N", help="tokens per speculative run (default: %(default)s)")
    g.add_argument("--spec-repeats", type=int, default=2, metavar="N", help="interleaved repeats per prompt (default: %(default)s)")
    g.add_argument("--spec-warmup-tokens", type=int, default=40, metavar="N",
                   help="tokens of the warm-up round; a self-speculative plan search finishes in it (default: %(default)s)")
    b.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables (markdown, for BENCHMARKS.md) here (default: not written)")
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
    from .eval.decoding import KINDS

    unknown = [k for k in args.spec_prompts if k not in KINDS]
    if unknown:
        parser.error(f"--spec-prompts: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
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
            lines += textwrap.wrap(_first_sentence(cls.__doc__), width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                   break_on_hyphens=False)
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
    from .eval import bench_report

    report = bench(args)
    print(bench_report.format_report(report))
    bench_report.write_outputs(report, args)
    failed = [r["recipe"] for r in report.rows if "error" in r]
    if failed:
        print(f"infertrix bench: {len(failed)} recipe(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
