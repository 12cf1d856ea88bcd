"""Our KV-cache policies and kvpress's presses on the same RULER samples, in one table.

    python -m benchmarks.kvcache_compare --ours bench-out/ruler/kvcache-ruler-2k-agnostic.json \\
        --kvpress bench-out/ruler/kvpress-0.5.json [--section kvcache-ruler-kvpress]

``--ours``: the JSON that ``python -m benchmarks.kvcache --suite ruler --protocols agnostic`` writes
(benchmarks/kvcache_ruler.py); ``--kvpress``: the JSON of benchmarks/kvpress_ruler.py (same samples,
model and question-agnostic protocol, kvpress's presses). One row per method and compression ratio:
the average RULER score over the tasks both files hold, seconds per sample, the cache after the context
against the full cache of the same side, and kvpress's score minus ours. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from benchmarks.report import markdown_table, write_section

# kvpress press name (benchmarks/kvpress_ruler.py) -> our label's method (benchmarks/kvcache.py cells)
OURS_OF = {
    "full": "full cache", "SnapKV": "snapkv", "TOVA": "tova", "Knorm": "knorm", "StreamingLLM": "streamingllm",
    "PyramidKV": "pyramidkv", "KeyDiff": "keydiff", "ExpectedAttention": "expected_attention",
    "ChunkKV": "chunkkv", "LagKV": "lagkv", "KVzip": "kvzip", "AdaKV": "adakv",  # kvpress's AdaKV over SnapKV, as ours
}
DEFAULT_COMPRESSION = 0.5  # KVPolicy.compression: recipe() leaves it out of a label at this value


def our_cell(label: str) -> tuple[str, float]:
    """(method, compression) of one of our labels: 'snapkv' -> (snapkv, 0.5), 'tova(compression=0.25)',
    'full cache' -> (full cache, 0), 'kivi:4' -> (kivi:4, 0)."""
    if label == "full cache" or label.startswith("kivi"):
        return label, 0.0
    name, _, args = label.partition("(")
    found = re.search(r"compression=([0-9.]+)", args)
    return name, float(found.group(1)) if found else DEFAULT_COMPRESSION


def kvpress_cell(label: str, cell: dict) -> tuple[str, float]:
    """(our method name or kvpress's press name where we have none, compression) of a kvpress cell."""
    return OURS_OF.get(cell["press"], cell["press"]), cell["ratio"]


def by_cell(results: dict, tasks: list[str], key) -> dict:
    """{(method, ratio): {task: cell}} over ``tasks``."""
    out: dict = {}
    for task in tasks:
        for label, cell in results[task].items():
            out.setdefault(key(label, cell), {})[task] = cell
    return out


def side(cells: dict, tasks: list[str], full: dict | None, kv_key: str) -> dict:
    """Average score, seconds per sample and KV against the full cache for one side's cell."""
    if cells is None or len(cells) < len(tasks):
        return {}
    out = {t: cells[t]["score"] for t in tasks}
    out["avg"] = sum(out[t] for t in tasks) / len(tasks)
    out["s"] = sum(cells[t]["s"] for t in tasks) / len(tasks)
    if all("times" in cells[t] for t in tasks):  # per-sample times (batch-1 runs): each task's median
        out["s"] = sum(statistics.median(cells[t]["times"]) for t in tasks) / len(tasks)
    if full and all((kv_key in c[t] or "kv" in c[t]) for c in (cells, full) for t in tasks):
        kv = sum(cells[t].get(kv_key, cells[t]["kv"]) for t in tasks)
        out["kv"] = kv / sum(full[t].get(kv_key, full[t]["kv"]) for t in tasks)
    return out


def rows(ours: dict | None, theirs: dict) -> tuple[list[dict], list[str]]:
    """One row per (method, ratio) of either side, ours first in our order; the tasks compared."""
    tasks = [t for t in theirs if ours is None or t in ours]
    a = by_cell(ours, tasks, lambda label, _c: our_cell(label)) if ours else {}
    b = by_cell(theirs, tasks, kvpress_cell)
    keys = list(a) + [k for k in b if k not in a]
    full_a, full_b = a.get(("full cache", 0.0)), b.get(("full cache", 0.0))
    out = []
    for key in keys:
        x, y = side(a.get(key), tasks, full_a, "kv"), side(b.get(key), tasks, full_b, "kv_kept")
        row = {"method": key[0], "ratio": key[1] or "-"}
        for t in tasks:
            row[t] = f"{_fmt(x.get(t))} / {_fmt(y.get(t))}"
        row |= {"ours avg": x.get("avg", ""), "kvpress avg": y.get("avg", ""),
                "kvpress - ours": y["avg"] - x["avg"] if x and y else "",
                "ours s/sample": x.get("s", ""), "kvpress s/sample": y.get("s", ""),
                "ours KV vs full": x.get("kv", ""), "kvpress KV vs full": y.get("kv", "")}
        out.append(row)
    return out, tasks


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", type=Path, default=None, help="benchmarks/kvcache_ruler.py's <section>-agnostic.json")
    ap.add_argument("--kvpress", type=Path, required=True, help="benchmarks/kvpress_ruler.py's JSON")
    ap.add_argument("--section", default=None, help="also write this BENCHMARKS.md section (default: print only)")
    ap.add_argument("--note", default="", help="a paragraph appended to the section")
    args = ap.parse_args(argv)
    ours = json.loads(args.ours.read_text()) if args.ours else None
    table, tasks = rows(ours, json.loads(args.kvpress.read_text()))
    text = markdown_table(table)
    print(f"tasks: {', '.join(tasks)} (per-task cells: ours / kvpress; scores 0-100)\n")
    print(text)
    if args.section:
        body = ("Our policies (benchmarks/kvcache_ruler.py, question-agnostic) and NVIDIA kvpress 0.5.5's presses "
                "(benchmarks/kvpress_ruler.py) on the same RULER samples, model and protocol. Per-task cells: "
                "ours / kvpress. KV vs full: the cache after the context against each side's full cache (kvpress: "
                "less the entries AdaKV and KVzip only mask).\n\n" + text + ("\n\n" + args.note if args.note else ""))
        cmd = "python -m benchmarks.kvcache_compare " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.section, "KV-cache policies on RULER: infertrix and kvpress side by side", body, cmd)


if __name__ == "__main__":
    main()
