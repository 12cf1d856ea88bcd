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
- decode tokens/s through ``generate`` (prompt 256 tokens, 64 new), speed-up over the baseline
  whose speed is measured several times across the run (median), to damp the noise of a shared
  machine;
- calibration time of ShortGPT / attention dropping (one shared pass, progress bar).
Writes the "skip" section of BENCHMARKS.md and a plot of perplexity against speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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


def agreement_prompts(n: int) -> list[str]:
    text = ixe.body_text()
    starts = [int(len(text) * (0.15 + 0.3 * k)) for k in range(n)]
    return [text[s : s + 400] for s in starts]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer windows, prompts and repeats (~3x faster)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ppl_tokens = 1024 if args.quick else 2048
    n_prompts = 1 if args.quick else 3
    speed_kw = dict(prompt_tokens=256, new_tokens=32 if args.quick else 64, repeats=1 if args.quick else 3)

    model, tok = models.load("smollm2")
    prompts = agreement_prompts(n_prompts)

    t0 = time.perf_counter()
    sims = ShortGPT(fraction=0.2, tokenizer=tok).measure(model)
    calib_s = time.perf_counter() - t0
    print(f"calibration (ShortGPT / attention drop, {sims.tokens} tokens): {calib_s:.1f} s")

    base_speeds = [ixe.measure_speed(model, tok, **speed_kw).decode_tokens_per_s]
    base_ppl_full = ixe.perplexity(model, tok, max_tokens=ppl_tokens)
    base_ppl = continuation_perplexity(model, tok, ppl_tokens)
    reference = ixe.greedy_tokens(model, tok, prompts, max_new_tokens=128)
    print(f"baseline: perplexity {base_ppl:.2f} (full windows {base_ppl_full:.2f}), decode {base_speeds[0]:.1f} tok/s")

    rows = []
    for method in args.methods:
        for f in args.fractions:
            t = METHODS[method](f, sims)
            row = {"method": method, "target": f"{f:.0%}"}
            try:
                ix.optimize(model, t)
            except ix.ConfigError as exc:
                row.update(note=str(exc).split(";")[0])
                rows.append(row)
                print(method, f, "skipped:", row["note"])
                continue
            try:
                plan = t.plan(model) if not isinstance(t, AdaSkip) else None
                ppl = continuation_perplexity(model, tok, ppl_tokens)
                agree = ixe.greedy_agreement(model, tok, prompts, reference, max_new_tokens=128)
                speed = ixe.measure_speed(model, tok, **speed_kw).decode_tokens_per_s
                if isinstance(t, AdaSkip):
                    plan = t.controller.plan  # the plan of the last prompt measured
                row.update(
                    skipped=f"{plan.compute_fraction(model):.1%}",
                    units=len(plan),
                    perplexity=ppl,
                    agreement=agree,
                    decode_tok_s=speed,
                )
            finally:
                ix.restore(model)
            rows.append(row)
            print(row)
        base_speeds.append(ixe.measure_speed(model, tok, **speed_kw).decode_tokens_per_s)

    base_speed = statistics.median(base_speeds)
    for r in rows:
        if "decode_tok_s" in r:
            r["speedup"] = r["decode_tok_s"] / base_speed
    report(rows, base_ppl, base_ppl_full, base_speed, base_speeds, calib_s, sims.tokens, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


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


def report(rows, base_ppl, base_ppl_full, base_speed, base_speeds, calib_s, calib_tokens, args) -> None:
    plot(rows, base_ppl)
    cols = ["method", "target", "skipped", "units", "perplexity", "agreement", "decode_tok_s", "speedup", "note"]
    table = markdown_table([{"method": "baseline", "target": "0%", "skipped": "0%", "perplexity": base_ppl,
                             "agreement": 1.0, "decode_tok_s": base_speed, "speedup": 1.0}] + rows, cols)
    at20 = [r for r in rows if r["target"] == "20%" and "perplexity" in r]
    verdict = ""
    if at20:
        best = min(at20, key=lambda r: r["perplexity"])
        fastest = max(at20, key=lambda r: r["speedup"])
        verdict = (
            f"- At 20% skipped, the lowest perplexity is **{best['method']}** ({best['perplexity']:.1f}, "
            f"decode speed-up {best['speedup']:.2f}x); the target is a speed-up of at least 1.2x for that "
            f"method: **{'met' if best['speedup'] >= 1.2 else 'not met'}**. Fastest at 20%: {fastest['method']} "
            f"({fastest['speedup']:.2f}x, perplexity {fastest['perplexity']:.1f}).\n"
        )
    body = (
        f"SmolLM2-135M-Instruct (30 layers), float32, {args.threads} threads. Perplexity: windows of 512 "
        f"tokens from the start of *Pride and Prejudice*, 128 prefilled, 384 scored as a continuation "
        f"(the full model's standard full-window perplexity is {base_ppl_full:.2f}). Agreement: greedy, "
        f"128 new tokens, {1 if args.quick else 3} prompt(s). Speed: `generate`, prompt 256, "
        f"{32 if args.quick else 64} new tokens; baseline decode {base_speed:.1f} tok/s is the median of "
        f"{len(base_speeds)} measurements across the run ({min(base_speeds):.1f}-{max(base_speeds):.1f}). "
        f"`skipped` is the share of the decoder layers' weights not run per decoded token (for AdaSkip: "
        f"the plan of the last prompt). Calibration (ShortGPT and attention dropping share one pass of "
        f"{calib_tokens} tokens): **{calib_s:.1f} s** (target < 60 s).\n\n"
        + verdict
        + "\n"
        + table
        + f"\n![perplexity against decode speed-up]({PLOT.relative_to(HERE.parent).as_posix()})\n"
    )
    print(body)
    if not args.no_write:
        write_section("skip", "Layer skipping (skip/)", body, "flock /tmp/infertrix-bench.lock python -m benchmarks.skip"
                      + (" --quick" if args.quick else ""))


if __name__ == "__main__":
    main()
