"""The main job's report (``infertrix bench``, :mod:`.workloads`): its record, the tables of each
family with their reading, the plot and the output files."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agreement import AGREEMENT_PROMPTS

FAMILIES = ("quant", "skip", "kvcache", "speculative", "moe")


@dataclass
class MainJobReport:
    model: str
    settings: dict[str, Any]
    rows: list[dict] = field(default_factory=list)  # every row has "family" and "recipe"
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each family's section

    def family(self, name: str) -> list[dict]:
        return [r for r in self.rows if r["family"] == name]

    def to_dict(self) -> dict[str, Any]:
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rows]
        return {"model": self.model, "settings": self.settings, "seconds": self.seconds, "rows": rows}


# -- tables ---------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return spec.format(v) if not isinstance(v, str) else v


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            cells = [r["recipe"], "error: " + r["error"]] + [""] * (len(columns) - 2)
        else:
            cells = [_fmt(r.get(k), spec) for k, _, spec in columns]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


GENERAL_COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("ppl_ratio", "ppl x", "{:.3f}"),
    ("agreement", "agree", "{:.1%}"),
    ("next_agreement", "next-token agree", "{:.1%}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("weight_MiB", "weights MiB", "{:.1f}"),
    ("apply_s", "apply s", "{:.1f}"),
    ("use_when", "use when", "{}"),
]
KV_COLUMNS = [
    ("recipe", "recipe", "{}"),
    ("passkey", "passkey", "{:.0%}"),
    ("ppl", "continuation ppl", "{:.2f}"),
    ("kv_MiB", "KV MiB/seq", "{:.1f}"),
    ("kv_ratio", "KV x", "{:.2f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("use_when", "use when", "{}"),
]


def _spec_columns(kinds: list[str]) -> list[tuple[str, str, str]]:
    cols = [("recipe", "recipe", "{}")]
    for k in kinds:
        cols += [(f"{k}_tok_s", f"{k} tok/s", "{:.1f}"), (f"{k}_speedup", f"{k} x", "{:.2f}"),
                 (f"{k}_accepted", f"{k} accepted", "{:.2f}"), (f"{k}_identical", f"{k} identical", "{}")]
    return cols + [("use_when", "use when", "{}")]


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r and r["recipe"] != "baseline"]


def _reading(family: str, rows: list[dict], kinds: list[str]) -> str:
    """One line saying what the table shows, from its figures."""
    ok = _ok(rows)
    if not ok:
        return ""
    if family in ("quant", "skip", "moe"):
        fast = max(ok, key=lambda r: r["decode_speedup"])
        faster = [r for r in ok if r["decode_speedup"] > 1.0]
        best = min(faster, key=lambda r: r["perplexity"]) if faster else None
        line = f"Fastest decode: `{fast['recipe']}` ({fast['decode_speedup']:.2f}x, perplexity x{fast['ppl_ratio']:.2f})."
        if best is not None:
            line += f" Lowest perplexity among recipes faster than the baseline: `{best['recipe']}` (x{best['ppl_ratio']:.2f}, {best['decode_speedup']:.2f}x)."
        return line
    if family == "kvcache":
        smaller = [r for r in ok if r.get("kv_ratio", 1) < 0.99]
        parts = []
        if smaller:
            best = max(smaller, key=lambda r: (r["passkey"], -r["kv_MiB"]))
            parts.append(f"Best retrieval with a smaller cache: `{best['recipe']}` (passkey {best['passkey']:.0%} with "
                         f"{best['kv_ratio']:.2f}x the KV bytes; full cache {rows[0].get('passkey', float('nan')):.0%}).")
        fast = max(ok, key=lambda r: r["decode_speedup"])
        parts.append(f"Fastest decode at this length: `{fast['recipe']}` ({fast['decode_speedup']:.2f}x).")
        return " ".join(parts)
    if family == "speculative":
        parts = []
        for k in kinds:
            have = [r for r in ok if f"{k}_speedup" in r]
            if have:
                fast = max(have, key=lambda r: r[f"{k}_speedup"])
                parts.append(f"on {k} prompts `{fast['recipe']}` ({fast[f'{k}_speedup']:.2f}x)")
        differs = sorted({r["recipe"] for r in ok for k in kinds if r.get(f"{k}_identical") == "NO"})
        line = ("Fastest: " + "; ".join(parts) + ".") if parts else ""
        return line + (f" Output differs from plain generate: {', '.join(differs)}." if differs
                       else " Every greedy output is token-identical to plain generate.")
    return ""


def format_report(report: MainJobReport) -> str:
    """The main job's markdown: one table per family, with its workload and a reading line."""
    s = report.settings
    kinds = list(s.get("spec_prompts", []))
    out = []
    general = (f"perplexity: {s.get('ppl_tokens')} tokens of *Pride and Prejudice* in {s.get('ppl_window')}-token windows; "
               f"agree: greedy tokens equal to the baseline's, position by position, over {len(AGREEMENT_PROMPTS)} "
               f"prompts x {s.get('agree_tokens')} tokens (one early difference shifts the rest); next-token agree: "
               "the same positions with the baseline's tokens fed back (teacher forcing through generate), how often "
               f"the recipe picks the baseline's next token; speed: greedy generate, {s.get('prompt_tokens')}-token prompt, "
               f"{s.get('new_tokens')} new tokens, batch 1, median of {s.get('repeats')}; apply s: time of optimize "
               "(calibration included)")
    sections = {
        "quant": ("quant: weights and kernels", general + ".", GENERAL_COLUMNS),
        "moe": ("moe: experts", general + ".", GENERAL_COLUMNS),
        "skip": ("skip: layers", general.replace("perplexity:", "continuation perplexity (the first quarter of each window, "
                 "at most 128 tokens, prefilled, the rest scored over the cache):") + ".", GENERAL_COLUMNS),
        "kvcache": (f"kvcache: {s.get('kv_context')}-token prompts",
                    f"passkey: {s.get('kv_trials')} trials of a 5-digit key hidden at depths 0.1-0.9 of *Pride and Prejudice*, "
                    f"greedy answer must contain it; continuation ppl: the next 128 tokens of prose after a "
                    f"{s.get('kv_context')}-token prompt held in the cell's cache; KV MiB/seq: every tensor the cache "
                    f"holds per sequence after that prompt; decode: batch 1 at {s.get('kv_context')} tokens, "
                    f"{s.get('kv_decode_rounds')} interleaved rounds of {s.get('kv_decode_steps')} steps, median step. "
                    "Every cell's cache is built from one recorded prefill (infertrix.eval.long_context).", KV_COLUMNS),
        "speculative": ("speculative: decoding loops",
                        f"prompt kinds {', '.join(kinds)} (rewrite: correct the spelling of a passage, copy-heavy; story, "
                        f"question: open-ended), chat template, batch 1, greedy, {s.get('spec_new_tokens')} new tokens, "
                        f"median of {s.get('spec_repeats')} rounds interleaved with plain generate; x: decode speed over "
                        "plain generate; accepted: tokens per verification forward; identical: output token-identical "
                        "to plain generate (it must be).", _spec_columns(kinds)),
    }
    for fam in FAMILIES:
        rows = report.family(fam)
        title, how, cols = sections[fam]
        if fam == "moe" and not _ok(rows) and not [r for r in rows if "error" in r]:
            from ..core.registry import available

            names = sorted(available("moe"))
            out.append(f"### {title}\n\nNot measured: no moe recipe was given ({', '.join(names)} act on models with "
                       f"MoE layers; {report.model} is dense unless it has them). benchmarks/moe.py measures expert "
                       "offloading on SmolLM2 upcycled to 8 experts.")
            continue
        if not rows:
            continue
        secs = report.seconds.get(fam if fam in ("kvcache", "speculative") else "general")
        timing = f" Section time: {secs / 60:.1f} min." if secs and fam in ("kvcache", "speculative") else ""
        reading = _reading(fam, rows, kinds)
        out.append(f"### {title}\n\n{how}{timing}\n\n{_table(rows, cols)}" + (f"\n\n{reading}" if reading else ""))
    errors = report.family("error")
    if errors:
        out.append("### recipes that could not be parsed\n\n" + _table(errors, [("recipe", "recipe", "{}"), ("error", "error", "{}")]))
    total = report.seconds.get("total")
    threads = s.get("threads")
    out.append(f"Model {report.model}, {threads} threads" + (f"; total time {total / 60:.1f} min." if total else "."))
    return "\n\n".join(out) + "\n"


def plot_report(report: MainJobReport, path: Path) -> None:
    """Quality against speed, one panel per family measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'infertrix[bench]'") from exc
    kinds = list(report.settings.get("spec_prompts", []))
    panels = [f for f in FAMILIES if any("error" not in r for r in report.family(f))]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], panels, strict=False):
        rows = [r for r in report.family(fam) if "error" not in r]
        if fam in ("quant", "skip", "moe"):
            pts = [(r.get("decode_speedup"), r.get("perplexity")) for r in rows]
            ax.set_xlabel("decode speed-up over baseline (x)")
            ax.set_ylabel("perplexity (lower is better)" if fam != "skip" else "continuation perplexity")
            if any(p[1] and p[1] > 100 for p in pts):
                ax.set_yscale("log")
        elif fam == "kvcache":
            pts = [(r.get("kv_MiB"), 100 * r["passkey"] if "passkey" in r else None) for r in rows]
            ax.set_xlabel(f"KV MiB per sequence at {report.settings.get('kv_context')} tokens")
            ax.set_ylabel("passkey accuracy (%)")
        else:
            a, b = (kinds + kinds)[:2]
            pts = [(r.get(f"{a}_speedup"), r.get(f"{b}_speedup")) for r in rows]
            ax.set_xlabel(f"speed-up on {a} prompts (x)")
            ax.set_ylabel(f"speed-up on {b} prompts (x)")
        for r, (x, y) in zip(rows, pts, strict=True):
            if x is None or y is None:
                continue
            ax.scatter(x, y, marker="*" if r["recipe"] == "baseline" else "o")
            ax.annotate(r["recipe"], (x, y), fontsize=7)
        ax.set_title(fam)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_outputs(report: MainJobReport, args: argparse.Namespace) -> None:
    """Write the --json, --markdown and --plot files the arguments ask for."""
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    if getattr(args, "markdown", None):
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_report(report))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if getattr(args, "plot", None):
        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
