"""KV-cache policies on SmolLM2: passkey retrieval, continuation perplexity, KV bytes, decode speed.

    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache            # the full grid
    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache --quick    # 1k and 2k only
    # in parts (each writes its own BENCHMARKS.md section):
    flock ... python -m benchmarks.kvcache --contexts 2048 --speed-context 0 --section kvcache-2k
    flock ... python -m benchmarks.kvcache --contexts --methods KIVI-4 --section kvcache-decode

For each prompt length (1k, 2k, 4k tokens) and each cell (full cache; every policy at compression
0.25 / 0.5 / 0.75; KIVI 4 and 2 bits):

- passkey accuracy: the prompts and scoring of ``infertrix.eval.passkey_accuracy`` (a 5-digit key at
  depths 0.1..0.9 of *Pride and Prejudice*, greedy answer must contain it), ``--trials`` per cell;
- perplexity of the next 128 tokens of real prose given a compressed prompt cache;
- KV bytes per sequence (``infertrix.eval.kv_cache_bytes``: every tensor the cache holds);
- at the longest length: decode tokens/s (batch 1, median step time) and the peak RSS of decoding.

A policy does not change the prefill itself (each layer attends to the whole prompt and is compressed
after), so every micro-batch of prompts is prefilled once and each cell's cache is built from it by
``infertrix.kvcache.replay`` - the very steps ``generate`` runs, checked identical to a real prefill
in tests/kvcache/test_replay.py. The script also cross-checks one cell against
``passkey_accuracy`` on the optimized model through ``generate``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import infertrix as ix
from benchmarks.report import markdown_table, write_section
from infertrix import eval as ixe
from infertrix import kvcache as kv
from infertrix.kvcache.replay import record_prefill, replay
from infertrix.models import load

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PLOT = Path(__file__).resolve().parent / "kvcache_passkey_vs_kv_bytes.png"


def cells(ratios, h2o_window: int | None, methods: list[str] | None = None):
    """(label, method, compression, policy, quant) for every cell of a table: the full cache always,
    then every method of ``methods`` (None: all; names as in ``METHODS`` plus KIVI-4 and KIVI-2)."""
    out = [("full cache", "full", 0.0, None, None)]
    h2o_kw = {"observation_window": h2o_window} if h2o_window else {}
    makers = {
        "StreamingLLM": lambda r: kv.StreamingLLM(compression=r),
        "KNorm": lambda r: kv.KNorm(compression=r),
        "SnapKV": lambda r: kv.SnapKV(compression=r),
        "PyramidKV": lambda r: kv.PyramidKV(compression=r),
        "H2O": lambda r: kv.H2O(compression=r, **h2o_kw),
        "D2O": lambda r: kv.D2O(compression=r, **h2o_kw),
        "TOVA": lambda r: kv.TOVA(compression=r),
        "Keyformer": lambda r: kv.Keyformer(compression=r),
        "R-KV": lambda r: kv.RKV(compression=r),
        "DensityKV": lambda r: kv.DensityKV(compression=r),
    }
    known = [*makers, "KIVI-4", "KIVI-2"]
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {known}")
    for name, make in makers.items():
        if methods is not None and name not in methods:
            continue
        for r in ratios:
            p = make(r)
            out.append((f"{p.recipe()}", name, r, p, None))
    for bits in (4, 2):
        if methods is None or f"KIVI-{bits}" in methods:
            out.append(
                (f"kivi:{bits}", f"KIVI {bits}-bit", 0.0, None, kv.KVQuantSpec(bits, 32, 32))
            )
    return out


class applied:
    """Apply a cell's transform for the duration of a block: installs the attention hooks that give
    layers of different lengths (PyramidKV) their slice of the mask and compress later prompt chunks."""

    def __init__(self, model, policy, quant):
        self.model, self.items = (
            model,
            [
                t
                for t in (
                    policy,
                    quant and kv.KIVI(quant.bits, quant.group_size, quant.residual_length),
                )
                if t
            ],
        )

    def __enter__(self):
        if self.items:
            ix.optimize(self.model, *self.items)

    def __exit__(self, *exc):
        if self.items:
            ix.restore(self.model)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_from(model, cache, first: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Decode ``steps`` more tokens after ``first`` [B, 1] from a prompt cache (as generate does)."""
    toks = [first]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = mask.sum(-1, keepdim=True) - 1
        out = model(toks[-1], attention_mask=mask, position_ids=pos, cache=cache)
        toks.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(toks, 1)


def passkey_prompts(tok, context: int, trials: int, seed: int = 0):
    """The prompts and keys of ``infertrix.eval.passkey_accuracy`` (same RNG sequence)."""
    rng = random.Random(seed)
    out = []
    for i in range(trials):
        depth = DEPTHS[i % len(DEPTHS)]
        key = rng.randint(10000, 99999)
        prompt = ixe.passkey_prompt(tok, context, depth, key, offset=rng.randint(0, 10**6))
        out.append((tok(prompt).input_ids, key))
    return out


@torch.no_grad()
def run_context(
    model, tok, context: int, grid, trials: int, micro_batch: int, log, first_trial: int = 0
) -> dict[str, dict]:
    res = {label: {"correct": 0, "n": 0} for label, *_ in grid}
    prompts = passkey_prompts(tok, context, first_trial + trials)[first_trial:]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, trials, micro_batch):
        chunk = prompts[start : start + micro_batch]
        ids, mask = left_pad([p for p, _ in chunk], pad)
        t = time.time()
        rec = record_prefill(model, ids, mask, position_ids=positions(mask))
        first = rec.logits.argmax(-1, keepdim=True)
        log(
            f"  {context} tokens: prefill of trials {start}-{start + len(chunk) - 1} in {time.time() - t:.1f}s"
        )
        t = time.time()
        for label, _, _, policy, quant in grid:
            with applied(model, policy, quant):
                cache = replay(model, rec, policy, quant)
                gen = greedy_from(model, cache, first, mask, 6)
            for row, (_, key) in enumerate(chunk):
                found = re.findall(r"\d+", tok.decode(gen[row]))
                res[label]["correct"] += str(key) in found
                res[label]["n"] += 1
        log(f"  {context} tokens: {len(grid)} cells decoded in {time.time() - t:.1f}s")
        del rec
    # perplexity of a 128-token continuation of prose, 2 samples, and KV bytes per sequence
    text_ids = tok(ixe.body_text()[: (context + 200) * 2 * 8], add_special_tokens=False).input_ids
    cont = 128
    samples = [text_ids[o : o + context + cont] for o in (0, context + cont)]
    ids = torch.tensor(samples)
    prompt, target = ids[:, :context], ids[:, context:]
    rec = record_prefill(model, prompt, torch.ones_like(prompt))
    for label, _, _, policy, quant in grid:
        cache = replay(model, rec, policy, quant)
        kv_bytes = ixe.kv_cache_bytes(cache) / len(samples)
        mask = torch.ones(2, context + cont, dtype=torch.long)
        with applied(model, policy, quant):
            out = model(target, attention_mask=mask, cache=cache)
        logits = torch.cat([rec.logits[:, None], out.logits[:, :-1]], 1).float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        )
        res[label].update(ppl=math.exp(nll.item()), kv_bytes=kv_bytes)
    return res


def trimmed_rss() -> int:
    """Resident bytes now, after handing freed heap back to the OS (so a later peak is comparable)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return ixe.current_rss()


@torch.no_grad()
def decode_speed(model, tok, context: int, grid, steps: int, rounds: int, log) -> dict[str, dict]:
    """Decode tokens/s at ``context`` tokens, batch 1: ``rounds`` rounds, each running ``steps``
    steps of every cell in turn (interleaved, so slow phases of a shared machine hit every cell), on
    a fresh cache each round; the median step time of all rounds (first two steps of a round
    dropped). Memory: the peak RSS of building the cell's cache and decoding, above the RSS before."""
    ids = torch.tensor(
        [tok(ixe.body_text()[: context * 8], add_special_tokens=False).input_ids[:context]]
    )
    mask = torch.ones_like(ids)
    rec = record_prefill(model, ids, mask)
    first = rec.logits.argmax(-1, keepdim=True)
    out = {label: {"times": [], "peak": 0} for label, *_ in grid}
    for rnd in range(rounds):
        for label, _, _, policy, quant in grid:
            times = out[label]["times"]

            def run(policy=policy, quant=quant, times=times):
                cache = replay(model, rec, policy, quant)
                m, tokn = mask, first
                for i in range(steps):
                    m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                    t = time.perf_counter()
                    o = model(
                        tokn,
                        attention_mask=m,
                        position_ids=m.sum(-1, keepdim=True) - 1,
                        cache=cache,
                    )
                    tokn = o.logits[:, -1:].argmax(-1)
                    if i >= 2:
                        times.append(time.perf_counter() - t)
                return ixe.kv_cache_bytes(cache), getattr(cache, "scratch_bytes", lambda: 0)()

            base = trimmed_rss()
            with applied(model, policy, quant):
                (kv_bytes, scratch), peak = ixe.peak_rss(run)
            d = out[label]
            d.update(kv_bytes=kv_bytes, scratch=scratch, peak=max(d["peak"], peak - base))
            if rnd == rounds - 1:
                d["decode_tok_s"] = 1.0 / statistics.median(d["times"])
                log(f"  decode at {context}: {label}: {d['decode_tok_s']:.1f} tok/s")
    return out


def kv_expected(context: int, compression: float) -> float:
    return math.ceil((1 - compression) * context - 1e-9) / context


def main(argv: list[str]) -> None:
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
    grid = [("cell", "", 0.5, policy, None)]
    res = run_context_passkey_only(model, tok, context, grid, trials)
    return res["cell"]["correct"] / res["cell"]["n"], res


@torch.no_grad()
def run_context_passkey_only(model, tok, context, grid, trials):
    res = {label: {"correct": 0, "n": 0} for label, *_ in grid}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for ids_list, key in passkey_prompts(tok, context, trials):
        ids, mask = left_pad([ids_list], pad)
        rec = record_prefill(model, ids, mask)
        first = rec.logits.argmax(-1, keepdim=True)
        for label, _, _, policy, quant in grid:
            with applied(model, policy, quant):
                gen = greedy_from(model, replay(model, rec, policy, quant), first, mask, 6)
            res[label]["correct"] += str(key) in re.findall(r"\d+", tok.decode(gen[0]))
            res[label]["n"] += 1
    return res


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
