"""The main job (``infertrix bench``): each family of transforms measured on the workload it is for.

A recipe belongs to the family of its transform of the latest stage (decoding > cache > layers >
kernels > experts > weights), so ``"w4a8,pld"`` is measured as speculative decoding on its quantized
model and ``"w4a8,snapkv:0.5"`` as a KV-cache policy on it. Every family's table starts with the
baseline measured on the same workload, and every row carries the transform's ``use_when`` line.

- **quant** (weights, kernels) and **moe**: perplexity of full windows of *Pride and Prejudice*,
  greedy agreement with the baseline, prefill/decode tokens/s through ``generate`` at a short prompt
  (:func:`infertrix.eval.measure_speed`), weight bytes, apply time (calibration included).
- **skip**: the same, with continuation perplexity (:func:`infertrix.eval.continuation_perplexity`)
  so that prompt- and position-dependent skipping (AdaSkip, SkipDecode) is scored as it runs.
- **kvcache**: at a long prompt (``--kv-context``, 2048 tokens): passkey retrieval, perplexity of a
  continuation held in the compressed cache, KV bytes per sequence and decode tokens/s at that
  length (:mod:`infertrix.eval.long_context`: one recorded prefill, every cell's cache replayed).
- **speculative**: copy-heavy rewrite prompts and open prompts (:mod:`infertrix.eval.decoding`):
  decode speed against the baseline's plain ``generate``, interleaved, and token identity with it.

Quant, moe and skip recipes each run on a freshly loaded model; kvcache and speculative recipes
share one model per family (transforms applied and restored around each measurement), except a
KV recipe with non-cache transforms, which gets its own model with them applied. A recipe that
fails is reported as an error row; the others still run.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..core.api import describe, optimize, restore
from ..core.recipe import parse_recipe
from ..core.transform import Stage, Transform
from .agreement import AGREEMENT_PROMPTS, greedy_tokens, next_token_agreement, token_agreement
from .bench_report import MainJobReport
from .decoding import compare_decoding
from .long_context import KVCell, decode_speed, passkey_and_perplexity
from .memory import peak_rss
from .perplexity import continuation_perplexity, perplexity
from .speed import measure_speed, pinned_threads

FAMILY_OF_STAGE = {
    Stage.WEIGHTS: "quant",
    Stage.KERNELS: "quant",
    Stage.EXPERTS: "moe",
    Stage.LAYERS: "skip",
    Stage.CACHE: "kvcache",
    Stage.DECODING: "speculative",
}
Log = Callable[[str], None]


def family_of(transforms: list[Transform]) -> str:
    """The family whose workload measures a recipe: that of its latest-stage transform."""
    if not transforms:
        return "baseline"
    return FAMILY_OF_STAGE[max(t.stage for t in transforms)]


def use_when(transforms: list[Transform]) -> str:
    """The ``use_when`` line of the transform that decides a recipe's family."""
    if not transforms:
        return "the reference: the model as loaded"
    t = max(transforms, key=lambda t: int(t.stage))
    return type(t).use_when or (type(t).__doc__ or "").strip().split("\n")[0]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def measure_general(model, tok, recipe: str, args, reference: list[list[int]] | None, family: str) -> dict:
    """Apply ``recipe`` and measure the quant/skip/moe row: perplexity (continuation perplexity for
    skip), agreement with ``reference``, speed through generate, weight bytes, apply time."""
    row: dict = {"family": family, "recipe": recipe}
    t = time.perf_counter()
    optimize(model, recipe)
    row["apply_s"] = time.perf_counter() - t
    d = describe(model)
    row["weight_MiB"] = (d.bytes_now - d.bytes_held) / 2**20  # the weights in use, not what restore keeps
    with pinned_threads(args.threads):
        if family == "skip":
            row["perplexity"] = continuation_perplexity(model, tok, max_tokens=args.ppl_tokens, window=args.ppl_window,
                                                        context=min(128, args.ppl_window // 4))
        else:
            row["perplexity"] = perplexity(model, tok, max_tokens=args.ppl_tokens, window=args.ppl_window, progress=True)
        tokens = greedy_tokens(model, tok, AGREEMENT_PROMPTS, max_new_tokens=args.agree_tokens, progress=True)
        row["next_agreement"] = (next_token_agreement(model, tok, AGREEMENT_PROMPTS, reference, progress=True)
                                 if reference is not None else 1.0)
    row["agreement"] = token_agreement(tokens, reference) if reference is not None else 1.0
    speed, peak = peak_rss(lambda: measure_speed(model, tok, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                                 repeats=args.repeats, threads=args.threads))
    row["prefill_tok_s"] = speed.prefill_tokens_per_s
    row["decode_tok_s"] = speed.decode_tokens_per_s
    row["peak_rss_MiB"] = peak / 2**20
    row["_tokens"] = tokens
    row["describe"] = d.to_dict()
    return row


def _relative(rows: list[dict], base: dict, pairs: dict[str, str]) -> None:
    for r in rows:
        for key, out in pairs.items():
            if key in r and key in base and base[key]:
                r[out] = r[key] / base[key]


def run_general(load, recipes: list[tuple[str, list[Transform], str]], args, log: Log) -> list[dict]:
    """Baseline and the quant/moe/skip recipes, each on a freshly loaded model."""
    families = {f for _, _, f in recipes}
    model, tok = load()
    log("quant: baseline")
    base = measure_general(model, tok, "baseline", args, None, "quant")
    rows = [base]
    if "moe" in families:
        rows.append({**base, "family": "moe"})
    if "skip" in families:  # the skip baseline differs only in how perplexity is scored
        with pinned_threads(args.threads):
            ppl = continuation_perplexity(model, tok, max_tokens=args.ppl_tokens, window=args.ppl_window,
                                          context=min(128, args.ppl_window // 4))
        rows.append({**base, "family": "skip", "perplexity": ppl})
    del model
    for recipe, _, fam in recipes:
        if fam not in ("quant", "moe", "skip"):
            continue
        log(f"{fam}: {recipe}")
        gc.collect()
        model, tok = load()
        try:
            row = measure_general(model, tok, recipe, args, base["_tokens"], fam)
        except Exception as exc:  # noqa: BLE001 - one failing recipe must not hide the others
            row = {"family": fam, "recipe": recipe, "error": _error(exc)}
        rows.append(row)
        del model
    for fam in ("quant", "moe", "skip"):
        mine = [r for r in rows if r["family"] == fam]
        if mine:
            _relative(mine, mine[0], {"perplexity": "ppl_ratio", "decode_tok_s": "decode_speedup",
                                      "prefill_tok_s": "prefill_speedup", "weight_MiB": "weight_ratio"})
    return rows


def _kv_cells_measure(model, tok, cells: list[KVCell], args, log: Log) -> dict[str, dict]:
    res = passkey_and_perplexity(model, tok, args.kv_context, cells, args.kv_trials, micro_batch=5, log=log)
    speed = decode_speed(model, tok, args.kv_context, cells, args.kv_decode_steps, args.kv_decode_rounds, log)
    for label, d in res.items():
        d["decode_tok_s"] = speed[label]["decode_tok_s"]
    return res


def run_kvcache(load, recipes: list[tuple[str, list[Transform], str]], args, log: Log) -> list[dict]:
    """The full cache and each KV recipe at ``args.kv_context`` tokens (see the module docstring)."""
    mine = [(r, ts) for r, ts, f in recipes if f == "kvcache"]
    pure = [(r, ts) for r, ts in mine if all(t.stage == Stage.CACHE for t in ts)]
    composed = [(r, ts) for r, ts in mine if (r, ts) not in pure]
    results: dict[str, dict] = {}
    with pinned_threads(args.threads):
        model, tok = load()
        cells = [KVCell("baseline")] + [KVCell(r, tuple(ts)) for r, ts in pure]
        log(f"kvcache: {len(cells)} cells at {args.kv_context} tokens")
        try:
            results.update(_kv_cells_measure(model, tok, cells, args, log))
        except Exception:  # noqa: BLE001 - find the failing cells: measure each alone
            log("kvcache: a cell failed; measuring each cell alone")
            for cell in cells:
                try:
                    results.update(_kv_cells_measure(model, tok, [cell], args, log))
                except Exception as exc:  # noqa: BLE001
                    if cell.label == "baseline":
                        raise
                    results[cell.label] = {"error": _error(exc)}
        del model
        for recipe, ts in composed:
            log(f"kvcache: {recipe} (own model)")
            gc.collect()
            model, tok = load()
            try:
                optimize(model, *[t for t in ts if t.stage != Stage.CACHE])
                cell = KVCell(recipe, tuple(t for t in ts if t.stage == Stage.CACHE))
                results.update(_kv_cells_measure(model, tok, [cell], args, log))
            except Exception as exc:  # noqa: BLE001
                results[recipe] = {"error": _error(exc)}
            del model
    rows = []
    for label in ["baseline"] + [r for r, _ in mine]:
        d = results[label]
        row = {"family": "kvcache", "recipe": label}
        if "error" in d:
            rows.append({**row, "error": d["error"]})
            continue
        row.update(passkey=d["correct"] / d["n"], passkey_trials=d["n"], ppl=d["ppl"], kv_MiB=d["kv_bytes"] / 2**20,
                   decode_tok_s=d["decode_tok_s"])
        rows.append(row)
    _relative(rows, rows[0], {"kv_MiB": "kv_ratio", "decode_tok_s": "decode_speedup", "ppl": "ppl_ratio"})
    return rows


def run_speculative(load, recipes: list[tuple[str, list[Transform], str]], args, log: Log) -> list[dict]:
    """Plain generate and each speculative recipe on the ``--spec-prompts`` kinds (batch 1, greedy)."""
    mine = [(r, ts) for r, ts, f in recipes if f == "speculative"]
    model, tok = load()
    tok.padding_side = "left"
    rows = {r: {"family": "speculative", "recipe": r} for r in ["baseline"] + [r for r, _ in mine]}
    variants: dict[str, tuple] = {}
    for recipe, ts in mine:  # a short probe, so that one failing recipe does not stop the others
        try:
            optimize(model, *ts)
            enc = tok("Hello", return_tensors="pt")
            model.generate(**enc, max_new_tokens=4, do_sample=False)
            variants[recipe] = tuple(ts)
        except Exception as exc:  # noqa: BLE001
            rows[recipe]["error"] = _error(exc)
        finally:
            restore(model)
    with pinned_threads(args.threads):
        for kind in args.spec_prompts:
            log(f"speculative: {kind} prompts, {len(variants)} recipes")
            for r in compare_decoding(model, tok, variants, kind, batch=1, mode="greedy", new_tokens=args.spec_new_tokens,
                                      repeats=args.spec_repeats, warmup_tokens=args.spec_warmup_tokens):
                row = rows["baseline" if r["method"] == "plain" else r["method"]]
                row[f"{kind}_tok_s"] = r["decode tok/s"]
                row[f"{kind}_speedup"] = r["speed-up"]
                row[f"{kind}_accepted"] = r["mean accepted length"] if r["mean accepted length"] != "" else None
                row[f"{kind}_identical"] = r["identical to plain"] or None
    del model
    return list(rows.values())


def run_main_job(model_name: str, recipes: list[str], args: argparse.Namespace, log: Log | None = None) -> MainJobReport:
    """Measure the baseline and ``recipes`` on ``model_name``, each family on its workload."""
    from .. import models

    start = time.time()
    log = log or (lambda msg: print(f"[{time.time() - start:6.0f}s] {msg}", file=sys.stderr, flush=True))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                if k not in ("command", "recipe", "json", "plot", "markdown")}
    report = MainJobReport(model_name, settings)
    parsed: list[tuple[str, list[Transform], str]] = []
    for recipe in recipes:
        if recipe == "baseline":
            continue
        try:
            ts = parse_recipe(recipe)
            parsed.append((recipe, ts, family_of(ts)))
        except Exception as exc:  # noqa: BLE001 - an unknown name is reported as a row, not a crash
            report.rows.append({"family": "error", "recipe": recipe, "error": _error(exc)})

    def load():
        return models.load(model_name)

    sections = [("general", run_general)]
    if any(f == "kvcache" for *_, f in parsed):
        sections.append(("kvcache", run_kvcache))
    if any(f == "speculative" for *_, f in parsed):
        sections.append(("speculative", run_speculative))
    for name, run in tqdm(sections, desc="sections"):
        t = time.time()
        report.rows.extend(run(load, parsed, args, log))
        report.seconds[name] = time.time() - t
        gc.collect()
    for r in report.rows:
        ts = next((ts for rec, ts, _ in parsed if rec == r["recipe"]), [])
        r["use_when"] = use_when(ts)
    report.seconds["total"] = time.time() - start
    return report
