"""KV-cache policies on SmolLM2: passkey retrieval, continuation perplexity, KV bytes, decode speed.

    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache            # the full grid
    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache --quick    # 1k and 2k only
    # in parts (each writes its own BENCHMARKS.md section):
    flock ... python -m benchmarks.kvcache --contexts 2048 --speed-context 0 --section kvcache-2k
    flock ... python -m benchmarks.kvcache --contexts --methods KIVI-4 --section kvcache-decode
    # RULER (after bash benchmarks/setup_ruler.sh): benchmarks/kvcache_ruler.py
    flock ... python -m benchmarks.kvcache --suite ruler --samples 10 --ratios 0.5

For each prompt length (1k, 2k, 4k tokens) and each cell (full cache; every policy at compression
0.25 / 0.5 / 0.75; KIVI 4 and 2 bits):

- passkey accuracy: the prompts and scoring of ``infertrix.eval.passkey_accuracy`` (a 5-digit key at
  depths 0.1..0.9 of *Pride and Prejudice*, greedy answer must contain it), ``--trials`` per cell;
- perplexity of the next 128 tokens of real prose given a compressed prompt cache;
- KV bytes per sequence (``infertrix.eval.kv_cache_bytes``: every tensor the cache holds);
- at the longest length: decode tokens/s (batch 1, median step time) and the peak RSS of decoding.

The measurements are ``infertrix.eval.long_context`` (shared with the main job, ``infertrix bench``).
A policy does not change the prefill itself (each layer attends to the whole prompt and is compressed
after), so every micro-batch of prompts is prefilled once and each cell's cache is built from it by
``infertrix.kvcache.replay`` - the very steps ``generate`` runs, checked identical to a real prefill
in tests/kvcache/test_replay.py. The script also cross-checks one cell against
``passkey_accuracy`` on the optimized model through ``generate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch

import infertrix as ix
from benchmarks.report import markdown_table, write_section
from infertrix import eval as ixe
from infertrix import kvcache as kv
from infertrix.eval.long_context import KVCell, passkey_and_perplexity
from infertrix.eval.long_context import decode_speed as long_context_decode
from infertrix.eval.passkey import DEPTHS
from infertrix.models import load

PLOT = Path(__file__).resolve().parent / "kvcache_passkey_vs_kv_bytes.png"


def cells(ratios, h2o_window: int | None, methods: list[str] | None = None, overrides: dict | None = None):
    """(label, method, compression, policy, quant) for every cell of a table: the full cache always,
    then every method of ``methods`` (None: all; class names of the policies, KIVI-4 and KIVI-2);
    ``overrides`` ({field: value}) sets each field on every policy that has it."""
    out = [("full cache", "full", 0.0, None, None)]
    makers = {}  # every registered eviction policy by class name: the registry is the list
    for cls in ix.available("kvcache").values():
        if issubclass(cls, kv.KVPolicy):
            fields = {f.name for f in dataclasses.fields(cls)}
            kw = {"observation_window": h2o_window} if h2o_window and "observation_window" in fields else {}
            kw.update({k: v for k, v in (overrides or {}).items() if k in fields})
            makers[cls.__name__] = functools.partial(cls, **kw)
    known = [*makers, "KIVI-4", "KIVI-2"]
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {known}")
    for name, make in makers.items():
        if methods is not None and name not in methods:
            continue
        for r in ratios:
            p = make(compression=r)
            out.append((f"{p.recipe()}", name, r, p, None))
    for bits in (4, 2):
        if methods is None or f"KIVI-{bits}" in methods:
            out.append(
                (f"kivi:{bits}", f"KIVI {bits}-bit", 0.0, None, kv.KIVI(bits=bits, group_size=32, residual_length=32))
            )
    return out


def kv_cells(grid) -> list[KVCell]:
    """The cells of ``infertrix.eval.long_context`` for a grid of :func:`cells` tuples."""
    out = []
    for label, _, _, policy, quant in grid:
        out.append(KVCell(label, tuple(t for t in (policy, quant) if t)))
    return out


def run_context(model, tok, context: int, grid, trials: int, micro_batch: int, log, first_trial: int = 0):
    return passkey_and_perplexity(model, tok, context, kv_cells(grid), trials, micro_batch, log, first_trial)


def decode_speed(model, tok, context: int, grid, steps: int, rounds: int, log):
    return long_context_decode(model, tok, context, kv_cells(grid), steps, rounds, log)


def kv_expected(context: int, compression: float) -> float:
    return math.ceil((1 - compression) * context - 1e-9) / context


def main(argv: list[str]) -> None:
    suite = argparse.ArgumentParser(add_help=False)
    suite.add_argument("--suite", choices=["passkey", "ruler"], default="passkey")
    chosen, argv = suite.parse_known_args(argv)
    if chosen.suite == "ruler":  # RULER tasks: benchmarks/kvcache_ruler.py
        from benchmarks.kvcache_ruler import main as ruler_main

        cmd = "flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache --suite ruler " + " ".join(argv)
        return ruler_main(argv, cmd.strip())
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="1k and 2k prompts, compression 0.5 only",
    )
    ap.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=None,
        help="prompt lengths of the passkey/perplexity tables (default 1024 2048 4096; none: no tables)",
    )
    ap.add_argument(
        "--h2o-window",
        type=int,
        default=256,
        help="H2O/D2O accumulate attention of the last N prompt queries (0: every prompt query, "
        "the paper's setting, a full prompt x prompt attention per cell)",
    )
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument(
        "--first-trial",
        type=int,
        default=0,
        help="skip the first N passkey prompts (more trials for some cells in a separate run)",
    )
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    ap.add_argument("--micro-batch", type=int, default=5)
    ap.add_argument("--speed-context", type=int, default=4096)
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="subset of methods, e.g. SnapKV H2O KIVI-4 (the full cache is always measured)",
    )
    ap.add_argument(
        "--check-trials", type=int, default=5, help="trials of the generate cross-check (0: skip)"
    )
    ap.add_argument(
        "--section", default="kvcache", help="BENCHMARKS.md section to write (kvcache...)"
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.contexts is None:
        args.contexts = [1024, 2048] if args.quick else [1024, 2048, 4096]
    contexts = args.contexts
    if args.quick and args.ratios == [0.25, 0.5, 0.75]:
        args.ratios = [0.5]
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    model, tok = load("smollm2")
    model.eval()
    grid = cells(args.ratios, args.h2o_window, args.methods)
    tables, results = [], {}
    for context in contexts:
        log(f"context {context}")
        res = run_context(
            model, tok, context, grid, args.trials, args.micro_batch, log, args.first_trial
        )
        results[context] = res
        full_bytes = res["full cache"]["kv_bytes"]
        rows = []
        for label, method, r, _, quant in grid:
            d = res[label]
            frac = d["kv_bytes"] / full_bytes
            expect = kv_expected(context, r) if quant is None else None
            rows.append(
                {
                    "cell": label,
                    "method": method,
                    "compression": r if quant is None else f"{quant.bits}-bit",
                    "passkey": f"{d['correct']}/{d['n']} ({100 * d['correct'] / d['n']:.0f}%)",
                    "ppl": d["ppl"],
                    "KV KiB/seq": d["kv_bytes"] / 1024,
                    "KV vs full": frac,
                    "KV vs budget": f"{100 * (frac / expect - 1):+.1f}%" if expect else "",
                }
            )
            d["frac"] = frac
        tables.append((context, rows))
        print(markdown_table(rows))
    speed_rows = []
    if args.speed_context:
        speed_grid = cells([0.5], args.h2o_window)  # every method at 0.5, whatever --methods says
        log(f"decode speed at {args.speed_context}")
        speed = decode_speed(
            model, tok, args.speed_context, speed_grid, args.speed_steps, args.speed_rounds, log
        )
        base = speed["full cache"]["decode_tok_s"]
        for label, *_ in speed_grid:
            s = speed[label]
            speed_rows.append(
                {
                    "cell": label,
                    "decode tok/s": s["decode_tok_s"],
                    "vs full cache": s["decode_tok_s"] / base,
                    "KV MiB": s["kv_bytes"] / 2**20,
                    "of which dequant buffer MiB": s["scratch"] / 2**20,
                    "peak RSS over baseline MiB": s["peak"] / 2**20,
                }
            )
        print(markdown_table(speed_rows))

    # cross-check: the library path (generate on an optimized model) gives the same passkey answers
    check_ctx, check_trials = (contexts[0], args.check_trials) if contexts else (0, 0)
    lib_acc = bench_acc = float("nan")
    if check_trials:
        ix.optimize(model, kv.SnapKV(compression=0.5))
        lib_acc = ixe.passkey_accuracy(model, tok, context_tokens=check_ctx, trials=check_trials)
        ix.restore(model)
        bench_acc, _ = single_cell_accuracy(
            model, tok, check_ctx, check_trials, kv.SnapKV(compression=0.5)
        )
        log(
            f"cross-check at {check_ctx}: passkey_accuracy via generate {lib_acc:.2f}, replay {bench_acc:.2f}"
        )

    plot_path = PLOT.with_name(f"{args.section}_passkey_vs_kv_bytes.png")
    if tables:
        plot(tables, grid, plot_path)
    elapsed = time.time() - t0
    body = report_body(
        tables, speed_rows, args, contexts, lib_acc, bench_acc, check_ctx, check_trials, elapsed
    )
    print(body)
    if not args.no_write:
        cmd = "flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache " + " ".join(argv)
        write_section(
            args.section, "KV-cache policies on SmolLM2-135M-Instruct", body, command=cmd.strip()
        )
    log("done")


def single_cell_accuracy(model, tok, context, trials, policy):
    """Passkey accuracy of one policy cell through the replay path, one trial at a time."""
    (cell,) = kv_cells([("cell", "", 0.5, policy, None)])
    res = passkey_and_perplexity(model, tok, context, [cell], trials, micro_batch=1, samples=0)["cell"]
    return res["correct"] / res["n"], res


def plot(tables, grid, path: Path = PLOT) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install infertrix[bench])")
        return
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    for ax, (context, rows) in zip(axes[0], tables, strict=True):
        by_method: dict[str, list] = {}
        for row in rows:
            acc = int(row["passkey"].split("(")[1].rstrip("%)"))
            by_method.setdefault(row["method"], []).append((row["KV KiB/seq"] / 1024, acc))
        for method, pts in by_method.items():
            pts.sort()
            style = "*" if method == "full" else ("s" if method.startswith("KIVI") else "o-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, markersize=7)
        ax.set_title(f"passkey at {context} tokens")
        ax.set_xlabel("KV cache MiB per sequence")
        ax.set_ylabel("passkey accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def report_body(
    tables, speed_rows, args, contexts, lib_acc, bench_acc, check_ctx, check_trials, elapsed
) -> str:
    h2o = (
        f"H2O/D2O accumulate the attention of the last {args.h2o_window} prompt queries "
        f"(observation_window={args.h2o_window}), not of every prompt query, to keep the runs short."
        if args.h2o_window
        else "H2O/D2O accumulate the attention of every prompt query."
    )
    parts = [f"SmolLM2-135M-Instruct (float32, sdpa), {args.threads} threads. {h2o}"]
    if tables:
        parts += [
            f"{'**--quick**: ' if args.quick else ''}"
            f"prompt lengths {contexts}, {args.trials} passkey trials per cell"
            f"{f' (trials {args.first_trial} to {args.first_trial + args.trials - 1})' if args.first_trial else ''}"
            f" (depths {DEPTHS}), "
            f"compression ratios {args.ratios} (fraction of tokens evicted; budget ceil((1-r) x prompt) per row and "
            "KV head, every full-attention layer). KIVI: group 32, residual 32 tokens. Perplexity: next 128 tokens "
            "of *Pride and Prejudice* after a prompt of the given length (2 samples). KV KiB/seq: every tensor the "
            "cache holds (codes, scales, policy state) per sequence after the prompt. 'KV vs budget': KV bytes "
            "relative to the budget's share of the full cache.",
            f"Each micro-batch of {args.micro_batch} prompts is prefilled once and every cell's cache built from it "
            "with `infertrix.kvcache.replay` (identical to generate's own path, see tests/kvcache/test_replay.py)."
            + (
                f" Cross-check: `passkey_accuracy` through `generate` with snapkv:0.5 at {check_ctx} tokens, "
                f"{check_trials} trials: {lib_acc:.2f}; the replay path on the same trials: {bench_acc:.2f}."
                if check_trials
                else ""
            ),
        ]
    for context, rows in tables:
        parts.append(
            f"### {context}-token prompts\n\n"
            + markdown_table(
                rows,
                [
                    "cell",
                    "compression",
                    "passkey",
                    "ppl",
                    "KV KiB/seq",
                    "KV vs full",
                    "KV vs budget",
                ],
            )
        )
    if speed_rows:
        parts.append(
            f"### Decode at {args.speed_context} tokens\n\nBatch 1, {args.speed_rounds} interleaved rounds "
            f"(every cell in turn, a fresh cache each round) of {args.speed_steps} steps, median of the last "
            f"{args.speed_steps - 2} steps of each round. KV MiB: every tensor the cache holds after decoding, "
            "including KIVI's float32 buffer that the quantized tokens are dequantized into for attention (one "
            "buffer shared by all layers; 0 when decoding reads the codes directly, kivi_decode_attention). "
            "Peak RSS over baseline: the process's peak while building the cell's cache and decoding, minus "
            "its RSS just before.\n\n" + markdown_table(speed_rows)
        )
    if tables:
        parts.append(
            f"![passkey accuracy vs KV bytes](benchmarks/{args.section}_passkey_vs_kv_bytes.png)"
        )
    parts.append(f"Total run time: {elapsed / 60:.1f} min.")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
