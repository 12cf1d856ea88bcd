"""Layer skipping on SmolLM2: quality against decode speed for each method at 10/20/30% skipped.

    flock /tmp/infertrix-bench.lock python -m benchmarks.skip [--quick]

For each method and share of the decoder compute skipped (weights of the skipped layers or
sublayers over those of all 30 layers), on the same loaded model (each transform applied, measured,
then undone by ``restore``):
- perplexity on *Pride and Prejudice*: windows of 512 tokens, the first 128 prefilled as context,
  the other 384 fed as one continuation pass over the cache and scored. Every method is scored
  this way so that the prompt-dependent ones (AdaSkip measures on the prefill; SkipDecode skips by
  position) are measured as they run in generation. The standard full-window perplexity of the
  unmodified model is reported too.
- greedy agreement with the full model over 128 new tokens, on prompts from the novel;
- decode tokens/s: greedy decode steps over the cache after a 128-token prompt (prefill not
  timed), the full model and the method timed alternately ``repeats`` times in the same stretch of
  time, speed-up = ratio of the medians, to damp the noise of a shared machine;
- calibration time of ShortGPT / attention dropping (one shared pass, progress bar).
Writes the "skip" section of BENCHMARKS.md and a plot of perplexity against speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import models
from infertrix.skip import AdaSkip, AttentionDrop, ShortGPT, SkipDecode, UniformSkip

from .report import markdown_table, write_section

HERE = Path(__file__).resolve().parent
PLOT = HERE / "skip.png"

METHODS = {
    "uniform": lambda f, sims: UniformSkip(fraction=f),
    "shortgpt": lambda f, sims: ShortGPT(fraction=f, similarities=sims),
    "attn_drop": lambda f, sims: AttentionDrop(fraction=f, similarities=sims),
    "skipdecode": lambda f, sims: SkipDecode(fraction=f),
    "skipdecode_bi": lambda f, sims: SkipDecode(fraction=f, order="block_influence", similarities=sims),
    "adaskip": lambda f, sims: AdaSkip(fraction=f),
}
LABELS = {
    "uniform": "Uniform (ULS)",
    "shortgpt": "ShortGPT (block influence)",
    "attn_drop": "Attention drop (He et al.)",
    "skipdecode": "SkipDecode (lower layers, paper)",
    "skipdecode_bi": "SkipDecode (block-influence order)",
    "adaskip": "AdaSkip (on-the-fly sublayers)",
}


@torch.no_grad()
def continuation_perplexity(model, tok, max_tokens: int, window: int = 512, context: int = 128, batch: int = 4) -> float:
    """Perplexity of tokens ``context+1 .. window-1`` of each window, the first ``context`` prefilled."""
    wins = ixe.token_windows(tok, None, max_tokens, window)
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch]
        pre = model(input_ids=x[:, :context], use_cache=True)
        cont = model(input_ids=x[:, context:-1], past_key_values=pre.past_key_values, use_cache=True)
        logits = torch.cat([pre.logits[:, -1:], cont.logits], dim=1).float()
        target = x[:, context:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1))
        nll -= logp.sum().item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``ids`` (the prefill is not timed)."""
    out = model(input_ids=ids, use_cache=True)
    cache, x = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        x = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def interleaved_speed(model, make, ids: torch.Tensor, steps: int, repeats: int) -> tuple[float, float]:
    """(baseline, method) median decode seconds, timed alternately on the same model."""
    base, meth = [], []
    for _ in range(repeats):
        base.append(decode_seconds(model, ids, steps))
        ix.optimize(model, make())
        try:
            meth.append(decode_seconds(model, ids, steps))
        finally:
            ix.restore(model)
    return statistics.median(base), statistics.median(meth)


def agreement_prompts(n: int) -> list[str]:
    text = ixe.body_text()
    starts = [int(len(text) * (0.15 + 0.3 * k)) for k in range(n)]
    return [text[s : s + 400] for s in starts]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer windows, prompts and repeats (~3x faster)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for quality and speed (see the report)")
    ap.add_argument("--calib-threads", type=int, default=2, help="torch threads for calibration (target: 2 cores)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "skipdecode_bi"], choices=list(METHODS))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    args.ppl_tokens = 512 if args.quick else 1024
    args.prompts = 1 if args.quick else 2
    args.steps, args.repeats = (16, 2) if args.quick else (32, 3)

    model, tok = models.load("smollm2")
    prompts = agreement_prompts(args.prompts)
    speed_ids = ixe.prompt_ids(tok, 128)

    torch.set_num_threads(args.calib_threads)
    t0 = time.perf_counter()
    sims = ShortGPT(fraction=0.2, tokenizer=tok).measure(model)
    calib_s = time.perf_counter() - t0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ShortGPT(fraction=0.2, tokenizer=tok, progress=False).measure(model)
    args.calib_1thread_s = time.perf_counter() - t0
    print(f"calibration (ShortGPT / attention drop, {sims.tokens} tokens, {args.calib_threads} threads): {calib_s:.1f} s")

    torch.set_num_threads(args.threads)
    decode_seconds(model, speed_ids, 4)  # warm-up
    base_ppl_full = ixe.perplexity(model, tok, max_tokens=args.ppl_tokens)
    base_ppl = continuation_perplexity(model, tok, args.ppl_tokens)
    reference = ixe.greedy_tokens(model, tok, prompts, max_new_tokens=128)
    print(f"baseline: perplexity {base_ppl:.2f} (full windows {base_ppl_full:.2f})")

    rows, base_speeds = [], []
    for method in args.methods:
        for f in args.fractions:
            make = lambda method=method, f=f: METHODS[method](f, sims)  # noqa: E731
            t = make()
            row = {"method": method, "target": f"{f:.0%}"}
            try:
                ix.optimize(model, t)
            except ix.ConfigError as exc:
                row.update(note=str(exc).split(";")[0])
                rows.append(row)
                print(method, f, "skipped:", row["note"])
                continue
            try:  # one failing configuration must not lose the others
                ppl = continuation_perplexity(model, tok, args.ppl_tokens)
                agree = ixe.greedy_agreement(model, tok, prompts, reference, max_new_tokens=128)
                plan = t.controller.plan if isinstance(t, AdaSkip) else t.plan(model)  # AdaSkip: last prompt's
                row.update(skipped=f"{plan.compute_fraction(model):.1%}", units=len(plan), perplexity=ppl, agreement=agree)
            except Exception as exc:  # noqa: BLE001
                row.update(note=f"error: {type(exc).__name__}: {exc}")
                rows.append(row)
                print(row, flush=True)
                continue
            finally:
                ix.restore(model)
            tb, tm = interleaved_speed(model, make, speed_ids, args.steps, args.repeats)
            base_speeds.append(args.steps / tb)
            row.update(decode_tok_s=args.steps / tm, base_tok_s=args.steps / tb, speedup=tb / tm)
            rows.append(row)
            print(row, flush=True)

    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    report(rows, base_ppl, base_ppl_full, base_speeds, calib_s, sims.tokens, args)


def plot(rows: list[dict], base_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(1.0, base_ppl)] + [(r["speedup"], r["perplexity"]) for r in rows if r["method"] == method and "speedup" in r]
        ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS.get(method, method))
        for r in rows:
            if r["method"] == method and "speedup" in r:
                ax.annotate(r["target"], (r["speedup"], r["perplexity"]), fontsize=7, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("decode speed-up over the full model (x)")
    ax.set_ylabel("perplexity on Pride and Prejudice (log scale)")
    ax.set_title("SmolLM2-135M: layer skipping, 10/20/30% of decoder compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def report(rows, base_ppl, base_ppl_full, base_speeds, calib_s, calib_tokens, args) -> None:
    plot(rows, base_ppl)
    cols = ["method", "target", "skipped", "units", "perplexity", "agreement", "decode_tok_s", "base_tok_s", "speedup", "note"]
    base_speed = statistics.median(base_speeds) if base_speeds else float("nan")
    table = markdown_table([{"method": "baseline", "target": "0%", "skipped": "0%", "perplexity": base_ppl,
                             "agreement": 1.0, "decode_tok_s": base_speed, "speedup": 1.0}] + rows, cols)
    at20 = [r for r in rows if r["target"] == "20%" and "perplexity" in r]
    verdict = ""
    if at20:
        best = min(at20, key=lambda r: r["perplexity"])
        fastest = max(at20, key=lambda r: r["speedup"])
        verdict = (
            f"- At 20% skipped, the lowest perplexity is **{best['method']}** ({best['perplexity']:.1f}, "
            f"decode speed-up {best['speedup']:.2f}x); target (that method at >= 1.2x): "
            f"**{'met' if best['speedup'] >= 1.2 else 'not met'}**. Fastest at 20%: {fastest['method']} "
            f"({fastest['speedup']:.2f}x, perplexity {fastest['perplexity']:.1f}).\n"
            f"- Calibration (ShortGPT and attention dropping share one pass of {calib_tokens} tokens, "
            f"{args.calib_threads} threads): **{calib_s:.1f} s**; target < 60 s: "
            f"**{'met' if calib_s < 60 else 'not met'}** (the same pass with 1 thread: "
            f"{args.calib_1thread_s:.1f} s).\n"
        )
    body = (
        f"SmolLM2-135M-Instruct (30 layers), float32. Perplexity: windows of 512 tokens from the start "
        f"of *Pride and Prejudice* ({args.ppl_tokens} tokens), 128 prefilled, 384 scored as a continuation "
        f"(the full model's standard full-window perplexity on the same tokens is {base_ppl_full:.2f}). "
        f"Agreement: greedy, 128 new tokens, {args.prompts} prompt(s) from the novel. Speed: {args.steps} greedy "
        f"decode steps after a 128-token prompt, full model and method timed alternately {args.repeats}x, "
        f"speed-up = ratio of medians; `base_tok_s` is the full model's speed in the same stretch. "
        f"Quality and speed use {args.threads} torch thread(s): on this shared, oversubscribed 2-core VM "
        f"two threads decode SmolLM2 at 0.45 tok/s against 5.9 tok/s for one (OpenMP threads wait for "
        f"each other), so the figures would be noise. `skipped` is the share of the decoder layers' weights "
        f"not run per decoded token (AdaSkip: the plan chosen for the last prompt; SkipDecode: after its "
        f"128-position ramp).\n\n"
        + verdict
        + "\n"
        + table
        + f"\n![perplexity against decode speed-up]({PLOT.relative_to(HERE.parent).as_posix()})\n"
    )
    print(body)
    if not args.no_write:
        cmd = " ".join(["flock /tmp/infertrix-bench.lock python -m benchmarks.skip", *sys.argv[1:]])
        write_section("skip", "Layer skipping (skip/)", body, cmd)


if __name__ == "__main__":
    main()
