"""Layer skipping on SmolLM2: quality against decode speed for each method at 10/20/30% skipped.

    python -m benchmarks.skip --part quality --json R.json                    # niced, no lock needed
    flock /tmp/infertrix-bench.lock python -m benchmarks.skip --part speed --json R.json [--methods ...]
    flock /tmp/infertrix-bench.lock python -m benchmarks.skip                 # both parts, one process

For each method and share of the decoder compute skipped (weights of the skipped layers or
sublayers over those of all 30 layers), on the same loaded model (each transform applied, measured,
then undone by ``restore``):
- quality part: perplexity on *Pride and Prejudice*: windows of 512 tokens, the first 128
  prefilled as context, the other 384 fed as one continuation pass over the cache and scored. Every
  method is scored this way so that the prompt-dependent ones (AdaSkip measures on the prefill;
  SkipDecode skips by position) are measured as they run in generation; the standard full-window
  perplexity of the unmodified model is reported too. Greedy agreement with the full model over
  128 new tokens, on prompts (equal-length token windows, one batch) from the novel.
- speed part (timing: run it under the lock): the torch thread count is chosen by measuring the
  full model's decode speed at 1 and 2 threads (``--threads auto``: 2 when it is faster, i.e. the
  machine is quiet enough); the calibration time of ShortGPT / attention dropping (one shared
  pass, progress bar); decode tokens/s: greedy decode steps over the cache after a 128-token prompt
  (prefill not timed), on two copies of the model, the full one and one with the method applied,
  alternating every decode step (so both see the same load); ``repeats`` such runs of ``steps``
  steps each give one speed-up each; the median speed-up and their min-max spread are reported.
Both parts merge their rows into ``--json`` (so the speed part can be split over several short
locked runs, by ``--methods``), and every run rewrites the "skip" section of BENCHMARKS.md and the
plot of perplexity against speed-up from everything measured so far.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import infertrix as ix
from infertrix import eval as ixe
from infertrix import models
from infertrix.eval import continuation_perplexity
from infertrix.skip import (
    AdaSkip,
    AttentionDrop,
    ShortGPT,
    Similarities,
    SkipDecode,
    SublayerCosts,
    UniformSkip,
    skip_state,
)

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
def decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``ids`` (the prefill is not timed)."""
    out = model(input_ids=ids, use_cache=True)
    cache, x = out.cache, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=x, cache=cache, use_cache=True)
        x = out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


@torch.no_grad()
def alternating_decode(full, optimized, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds of ``steps`` greedy decode steps of each model, alternating every step (prefill not timed).

    Two copies of the model, one with the method applied: a step of one, then a step of the other,
    so that both see the same load on a shared machine within a few hundred milliseconds.
    """
    caches, tokens, spent = [], [], [0.0, 0.0]
    for m in (full, optimized):
        out = m(input_ids=ids, use_cache=True)
        caches.append(out.cache)
        tokens.append(out.logits[:, -1:].argmax(-1))
    for _ in range(steps):
        for k, m in enumerate((full, optimized)):
            t = time.perf_counter()
            out = m(input_ids=tokens[k], cache=caches[k], use_cache=True)
            tokens[k] = out.logits[:, -1:].argmax(-1)
            spent[k] += time.perf_counter() - t
    return spent[0], spent[1]


def choose_threads(model, ids: torch.Tensor, steps: int, repeats: int = 3) -> dict:
    """Full-model decode tok/s at 1 and 2 threads, alternately; 2 threads only if they are faster
    (on a busy 2-core machine, OpenMP threads wait for each other and 2 are much slower)."""
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            torch.set_num_threads(n)
            speeds[n].append(steps / decode_seconds(model, ids, steps))
    med = {n: statistics.median(v) for n, v in speeds.items()}
    return {"tok_s_1_thread": med[1], "tok_s_2_threads": med[2], "threads": 2 if med[2] > med[1] else 1,
            "loadavg_1min": os.getloadavg()[0]}


@torch.no_grad()
def greedy_batch(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          min_new_tokens=new_tokens)[:, ids.shape[1]:]


def agreement_ids(tok, n: int, length: int = 128) -> torch.Tensor:
    """``n`` prompts of exactly ``length`` tokens from different places of the novel (no padding)."""
    text = ixe.body_text()
    rows = []
    for k in range(n):
        start = int(len(text) * (0.15 + 0.7 * k / max(n, 1)))
        rows.append(tok(text[start : start + length * 8], add_special_tokens=False).input_ids[:length])
    return torch.tensor(rows)


def decoder_weight_share(model) -> float:
    """Share of the weights a decode step streams that belong to the decoder layers (the rest: lm_head)."""
    decoder = SublayerCosts.from_model(model).total
    return decoder / (decoder + model.get_output_embeddings().weight.numel())


def calibrate(model, tok, threads: int, progress: bool = True) -> tuple[Similarities, float]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    sims = ShortGPT(fraction=0.2, tokenizer=tok, progress=progress).measure(model)
    return sims, time.perf_counter() - t0


def configs(args):
    for method in args.methods:
        for f in args.fractions:
            yield method, f, (lambda method=method, f=f, sims=None: METHODS[method](f, sims))


def quality_part(model, tok, args, store: dict) -> None:
    torch.set_num_threads(args.threads if isinstance(args.threads, int) else 1)
    sims, _ = calibrate(model, tok, torch.get_num_threads(), progress=False)
    prompts = agreement_ids(tok, args.prompts)
    base = store.setdefault("baseline", {})
    base["perplexity"] = continuation_perplexity(model, tok, args.ppl_tokens)
    base["perplexity_full_windows"] = ixe.perplexity(model, tok, max_tokens=args.ppl_tokens)
    base["ppl_tokens"], base["prompts"] = args.ppl_tokens, args.prompts
    reference = greedy_batch(model, prompts, 128)
    print(f"baseline: perplexity {base['perplexity']:.2f} (full windows {base['perplexity_full_windows']:.2f})", flush=True)
    for method, f, make in configs(args):
        row = store["rows"].setdefault(f"{method}@{f:.0%}", {"method": method, "target": f"{f:.0%}"})
        t = make(sims=sims)
        try:
            ix.optimize(model, t)
        except ix.ConfigError as exc:
            row.update(note=str(exc).split(";")[0])
            print(method, f, "not possible:", row["note"], flush=True)
            continue
        try:
            ppl = continuation_perplexity(model, tok, args.ppl_tokens)
            agree = (greedy_batch(model, prompts, 128) == reference).float().mean().item()
            plan = skip_state(model).controller.plan if isinstance(t, AdaSkip) else t.plan(model)  # AdaSkip: last batch's
            row.update(skipped=f"{plan.compute_fraction(model):.1%}", units=len(plan), perplexity=ppl, agreement=agree,
                       plan=repr(plan))
        finally:
            ix.restore(model)
        print(row, flush=True)


def speed_part(model, tok, args, store: dict) -> None:
    ids = ixe.prompt_ids(tok, 128)
    torch.set_num_threads(1)
    decode_seconds(model, ids, 4)  # warm-up
    probe = choose_threads(model, ids, 8)
    threads = probe["threads"] if args.threads == "auto" else int(args.threads)
    print(f"threads: {probe} -> {threads}", flush=True)
    sims, calib_s = calibrate(model, tok, args.calib_threads)
    _, calib_1 = calibrate(model, tok, 1, progress=False)
    run = {"methods": args.methods, "threads": threads, **probe, "calibration_s": calib_s,
           "calibration_threads": args.calib_threads, "calibration_1_thread_s": calib_1,
           "calibration_tokens": sims.tokens, "steps": args.steps, "repeats": args.repeats,
           "decoder_weight_share": decoder_weight_share(model),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    store["speed_runs"].append(run)
    print(f"calibration ({sims.tokens} tokens, {args.calib_threads} threads): {calib_s:.1f} s; 1 thread {calib_1:.1f} s")
    torch.set_num_threads(threads)
    decode_seconds(model, ids, 4)
    for method, f, make in configs(args):
        row = store["rows"].setdefault(f"{method}@{f:.0%}", {"method": method, "target": f"{f:.0%}"})
        try:  # budgets a method cannot reach (attention dropping above ~23%) are refused by its plan
            t = make(sims=sims)
            if not isinstance(t, AdaSkip):
                t.plan(model)
        except ix.ConfigError as exc:
            row.update(note=str(exc).split(";")[0])
            continue
        twin = copy.deepcopy(model)
        ix.optimize(twin, make(sims=sims))
        timed = [alternating_decode(model, twin, ids, args.steps) for _ in range(args.repeats)]
        del twin
        base, meth = [b for b, _ in timed], [m for _, m in timed]
        pairs = [b / m for b, m in timed]
        row.update(decode_tok_s=args.steps / statistics.median(meth), base_tok_s=args.steps / statistics.median(base),
                   speedup=statistics.median(pairs), speedup_min=min(pairs), speedup_max=max(pairs),
                   threads=threads, run=len(store["speed_runs"]))
        print({k: row[k] for k in ("method", "target", "speedup", "speedup_min", "speedup_max")}, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["quality", "speed", "all", "report"], default="all",
                    help="report: only rewrite BENCHMARKS.md and the plot from --json")
    ap.add_argument("--quick", action="store_true", help="fewer windows, prompts and repeats")
    ap.add_argument("--threads", default="auto", help="torch threads for speed: auto (measured), 1 or 2")
    ap.add_argument("--calib-threads", type=int, default=2, help="torch threads for calibration (target: 2 cores)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "skipdecode_bi"], choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 7, --quick 3)")
    ap.add_argument("--json", type=Path, default=None, help="merge the rows into this JSON file (created if absent)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.threads not in ("auto", "1", "2"):
        ap.error("--threads must be auto, 1 or 2")

    torch.manual_seed(0)
    args.ppl_tokens = 512 if args.quick else 2048
    args.prompts = 2 if args.quick else 4
    args.steps = 16 if args.quick else 32
    args.repeats = args.repeats or (3 if args.quick else 7)

    if args.part == "report":
        if not (args.json and args.json.exists()):
            ap.error("--part report needs --json with the measured rows")
        report(json.loads(args.json.read_text()), write=not args.no_write)
        return
    store = {"rows": {}, "speed_runs": [], "commands": []}
    store["commands"].append(" ".join(["python -m benchmarks.skip", *(argv if argv is not None else sys.argv[1:])]))
    model, tok = models.load("smollm2")
    if args.part in ("quality", "all"):
        quality_part(model, tok, args, store)
    if args.part in ("speed", "all"):
        speed_part(model, tok, args, store)
    if args.json:
        store = merge_into(args.json, store)
    report(store, write=not args.no_write)


def merge_into(path: Path, new: dict) -> dict:
    """Merge this run's measurements into the JSON at ``path`` (read at the end: parts may run concurrently)."""
    old = json.loads(path.read_text()) if path.exists() else {"rows": {}, "speed_runs": [], "commands": []}
    offset = len(old["speed_runs"])
    for key, row in new["rows"].items():
        if "run" in row:
            row["run"] += offset
        old["rows"].setdefault(key, {}).update(row)
    old["speed_runs"] += new["speed_runs"]
    old["commands"] += new["commands"]
    if "baseline" in new:
        old["baseline"] = new["baseline"]
    path.write_text(json.dumps(old, indent=1))
    return old


def plot(rows: list[dict], base_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and "speedup" in r and "perplexity" in r]
        if not mine:
            continue
        sx = [1.0] + [r["speedup"] for r in mine]
        sy = [base_ppl] + [r["perplexity"] for r in mine]
        err = [[0.0] + [r["speedup"] - r["speedup_min"] for r in mine], [0.0] + [r["speedup_max"] - r["speedup"] for r in mine]]
        ax.errorbar(sx, sy, xerr=err, marker="o", capsize=2, label=LABELS.get(method, method))
        for r in mine:
            ax.annotate(r["target"], (r["speedup"], r["perplexity"]), fontsize=7, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("decode speed-up over the full model (x; bars: min-max of the timed runs)")
    ax.set_ylabel("perplexity on Pride and Prejudice (log scale)")
    ax.set_title("SmolLM2-135M: layer skipping, 10/20/30% of decoder compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def verdict(rows: list[dict], runs: list[dict], base_ppl: float) -> str:
    at20 = [r for r in rows if r["target"] == "20%" and "perplexity" in r and "speedup" in r]
    lines = []
    if at20:
        best = min(at20, key=lambda r: r["perplexity"])
        fastest = max(at20, key=lambda r: r["speedup"])
        resolved = "above 1.2x in every run" if best["speedup_min"] >= 1.2 else (
            "above 1x in every run" if best["speedup_min"] > 1 else "not resolved from 1x")
        lines.append(
            f"- At 20% skipped, the lowest perplexity is **{best['method']}** ({best['perplexity']:.1f}; full model "
            f"{base_ppl:.2f}), decode speed-up **{best['speedup']:.2f}x** (runs {best['speedup_min']:.2f}-"
            f"{best['speedup_max']:.2f}x, {resolved}); target (that method at >= 1.2x): "
            f"**{'met' if best['speedup'] >= 1.2 else 'not met'}**. Fastest at 20%: {fastest['method']} "
            f"({fastest['speedup']:.2f}x, perplexity {fastest['perplexity']:.1f})."
        )
    for i, run in enumerate(runs, 1):
        lines.append(
            f"- Calibration (ShortGPT and attention dropping share one pass of {run['calibration_tokens']} tokens), "
            f"speed run {i}: **{run['calibration_s']:.1f} s** on {run['calibration_threads']} threads "
            f"({run['calibration_1_thread_s']:.1f} s on 1); target < 60 s: "
            f"**{'met' if run['calibration_s'] < 60 else 'not met'}**."
        )
    return "\n".join(lines) + "\n"


def report(store: dict, write: bool = True) -> None:
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(store["rows"].values(), key=lambda r: (order.get(r["method"], len(order)), float(r["target"].rstrip("%"))))
    base = store.get("baseline")
    runs = store["speed_runs"]
    if base is None:
        print("no quality part measured yet: nothing to report")
        return
    share = next((r["decoder_weight_share"] for r in runs if "decoder_weight_share" in r), None)
    for r in rows:
        if "speedup" in r:
            r["spread"] = f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}"
        if share and "skipped" in r:  # what streaming fewer weights alone would give
            r["weight_bound"] = 1 / (1 - share * float(r["skipped"].rstrip("%")) / 100)
    share_note = "" if share is None else f"; the decoder layers are {share:.1%} of them"
    plot(rows, base["perplexity"])
    cols = ["method", "target", "skipped", "units", "perplexity", "agreement", "decode_tok_s", "base_tok_s", "speedup",
            "spread", "weight_bound", "run", "note"]
    table = markdown_table([{"method": "baseline", "target": "0%", "skipped": "0%", "perplexity": base["perplexity"],
                             "agreement": 1.0, "speedup": 1.0}] + rows, cols)
    run_table = markdown_table(
        [{"run": i, "methods": " ".join(r["methods"]), "load (1 min)": r["loadavg_1min"],
          "full model tok/s, 1 thread": r["tok_s_1_thread"], "2 threads": r["tok_s_2_threads"],
          "threads used": r["threads"], "steps x runs": f"{r['steps']} x {r['repeats']}", "date": r["date"]}
         for i, r in enumerate(runs, 1)])
    body = (
        f"SmolLM2-135M-Instruct (30 layers), float32. Perplexity: windows of 512 tokens from the start of "
        f"*Pride and Prejudice* ({base['ppl_tokens']} tokens), 128 prefilled, 384 scored as a continuation over the "
        f"cache (the full model's standard full-window perplexity on the same tokens is "
        f"{base['perplexity_full_windows']:.2f}). Agreement: greedy, 128 new tokens, {base['prompts']} prompts of "
        f"128 tokens from the novel in one batch. Speed: greedy decode steps after a 128-token prompt (prefill not "
        f"timed) on two copies of the model, full and with the method, alternating every step; each run of "
        f"`steps` steps gives one speed-up: `speedup` is their median, `spread` their min-max; `weight_bound` is the speed-up if decode time were proportional to the weights "
        f"streamed per token (decoder layers plus lm_head{share_note}); `base_tok_s` is the full model's median in the same stretch, `run` the speed run "
        f"below. Each speed run first measures the full model's decode speed at 1 and 2 torch threads, "
        f"alternately, and uses 2 only if they are faster (2 cores shared with other jobs: when they are busy, "
        f"OpenMP threads wait for each other). `skipped` is the share of the decoder layers' weights not run per "
        f"decoded token (AdaSkip: the plan chosen for the last batch; SkipDecode: after its 128-position ramp).\n\n"
        + verdict(rows, runs, base["perplexity"])
        + "\nSpeed runs:\n\n" + run_table
        + "\n" + table
        + f"\n![perplexity against decode speed-up]({PLOT.relative_to(HERE.parent).as_posix()})\n"
    )
    print(body)
    if write:
        if runs and len({r["threads"] for r in runs}) == 1:
            torch.set_num_threads(runs[0]["threads"])  # the section header records the speed runs' threads
        cmds = "`, `".join(c if "--part quality" in c else f"flock /tmp/infertrix-bench.lock {c}" for c in store["commands"])
        write_section("skip", "Layer skipping (skip/)", body, cmds)


if __name__ == "__main__":
    main()
