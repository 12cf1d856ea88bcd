"""Quant family benchmark: the W4A8 kernel against float and int4 baselines, and SmolLM2 end to end.

    flock /tmp/infertrix-bench.lock python -m benchmarks.quant --part kernels   # kernel table (~10 min)
    nice -n 19 python -m benchmarks.quant --part quality       # quantize, perplexity, save models
    flock /tmp/infertrix-bench.lock python -m benchmarks.quant --part speed     # end-to-end speed
    ... --quick (kernels: a few rows), --no-write (print only), --only NAME..., --threads 1 2

Kernel table: median time of one call (``y = layer(x)``, float32 in and out) for each (M, N, K) and
thread count, with weights hot in cache (the call repeats on the same weights). Columns: float32
and bfloat16 ``F.linear``; torch's own int4 weight-only CPU op ``aten._weight_int4pack_mm_for_cpu``
(group 128, bfloat16 activations, its fast path); bitsandbytes NF4 (``bnb.matmul_4bit``) when it
runs here; ours, ``infertrix::w4a8_linear`` (group 128, zero points, per-token activation
quantization included). The bandwidth floor is the weight bytes of our layer divided by the
machine's measured copy bandwidth (a 1 GiB ``copy_``, read + write bytes); "% of floor" is floor
time / our time (above 100% means the weights came from cache faster than DRAM could stream them).
For M = 1 at 4096 x 4096 a "cold" row rotates over enough weight copies to exceed the L3 cache.

End to end on SmolLM2-135M-Instruct: greedy decode tokens/s (``infertrix.eval.measure_speed``,
256-token prompt, 64 new tokens, batch 1), peak RSS during those runs, model tensor bytes, and
perplexity on 4096 tokens of *Pride and Prejudice* (calibration uses windows from the END of the
book, never the evaluated beginning).
"""

from __future__ import annotations

# ruff: noqa: B023  (the timed lambdas run at once, inside their loop iteration)
import argparse
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.report import markdown_table, write_section

SMOL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
BIG_SHAPES = [(4096, 4096), (11008, 4096)]


def timeit(fn, min_runs: int = 5, min_time: float = 0.3) -> float:
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write traffic)."""
    src = torch.ones(2**28)  # 1 GiB
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), min_runs=5, min_time=1.0)
    return 2 * 2**30 / t


def torch_int4(w: torch.Tensor, group: int = 128):
    from infertrix.quant.int4 import quantize_int4

    n, k = w.shape
    q = quantize_int4(w, group, False, two_level=False)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.q.to(torch.int32), 2)
    step = q.group_scale.float()
    sz = torch.stack([step.t(), ((8 - q.zero.float()) * step).t()], -1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def bnb_nf4(w: torch.Tensor):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        qw, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=64)
        fn = lambda x: bnb.matmul_4bit(x, qw.t(), quant_state=state)  # noqa: E731
        fn(torch.randn(1, w.shape[1]))
        return fn
    except Exception as exc:  # noqa: BLE001 - optional baseline
        print(f"bitsandbytes NF4 unavailable: {exc}", file=sys.stderr)
        return None


def kernel_rows(threads_list, ms, shapes, bandwidth, with_bnb=True):
    from infertrix.quant import W4A8Linear

    rows = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        ours = W4A8Linear.from_linear(lin, 128, symmetric=False)
        wb = w.to(torch.bfloat16)
        ti4 = torch_int4(w) if k % 128 == 0 else torch_int4(w, 64)
        nf4 = bnb_nf4(w) if with_bnb else None
        our_bytes = sum(t.numel() * t.element_size() for t in ours.buffers())
        for threads in threads_list:
            torch.set_num_threads(threads)
            for m in ms:
                x = torch.randn(m, k)
                xb = x.to(torch.bfloat16)
                with torch.no_grad():
                    t32 = timeit(lambda: F.linear(x, w))
                    t16 = timeit(lambda: F.linear(xb, wb))
                    ti = timeit(lambda: ti4(xb))
                    tn = timeit(lambda: nf4(x)) if nf4 else float("nan")
                    to = timeit(lambda: ours(x))
                floor = our_bytes / bandwidth
                rows.append({
                    "threads": threads, "M": m, "N": n, "K": k,
                    "fp32 us": t32 * 1e6, "bf16 us": t16 * 1e6, "torch int4 us": ti * 1e6,
                    "bnb nf4 us": tn * 1e6, "w4a8 us": to * 1e6,
                    "vs fp32": t32 / to, "vs torch int4": ti / to, "floor us": floor * 1e6,
                    "% of floor": 100 * floor / to,
                })
                print(rows[-1], flush=True)
        gc.collect()
    return rows


def skinny_rows(threads_list, ms, shapes, bandwidth):
    """``infertrix::skinny_linear`` against ``F.linear`` (float32, same weights) by rows M."""
    from infertrix.ops import skinny_linear

    rows = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        for threads in threads_list:
            torch.set_num_threads(threads)
            for m in ms:
                x = torch.randn(m, k)
                with torch.no_grad():
                    t32 = timeit(lambda: F.linear(x, w))
                    ts = timeit(lambda: skinny_linear(x, w, None))
                floor = w.numel() * 4 / bandwidth
                rows.append({"threads": threads, "M": m, "N": n, "K": k, "F.linear us": t32 * 1e6,
                             "skinny us": ts * 1e6, "speed-up": t32 / ts, "floor us": floor * 1e6,
                             "% of floor": 100 * floor / ts})
                print(rows[-1], flush=True)
        gc.collect()
    return rows


def cold_row(bandwidth, threads=1, n=4096, k=4096):
    """M = 1 with weights rotated over copies larger than the L3 cache (DRAM-bound)."""
    from infertrix.quant import W4A8Linear

    torch.set_num_threads(threads)
    l3 = 260 * 2**20
    lin = torch.nn.Linear(k, n, bias=False)
    ours0 = W4A8Linear.from_linear(lin, 128)
    ob = sum(t.numel() * t.element_size() for t in ours0.buffers())
    copies = max(2, min(64, int(3 * l3 / ob) + 1))
    ours = [W4A8Linear.from_linear(lin, 128) for _ in range(copies)]
    fcop = max(2, int(3 * l3 / (n * k * 4)) + 1)
    ws = [lin.weight.detach().clone() for _ in range(fcop)]
    x = torch.randn(1, k)
    it = {"o": 0, "f": 0}

    def run_ours():
        it["o"] = (it["o"] + 1) % copies
        ours[it["o"]](x)

    def run_f():
        it["f"] = (it["f"] + 1) % fcop
        F.linear(x, ws[it["f"]])

    with torch.no_grad():
        to = timeit(run_ours, min_runs=3 * copies)
        t32 = timeit(run_f, min_runs=3 * fcop)
    floor = ob / bandwidth
    return {"threads": threads, "M": 1, "N": n, "K": k, "fp32 us": t32 * 1e6, "w4a8 us": to * 1e6,
            "vs fp32": t32 / to, "floor us": floor * 1e6, "% of floor": 100 * floor / to,
            "note": f"cold: {copies} weight copies ({copies * ob / 2**20:.0f} MiB) > L3"}


# the NF4 baseline rows need bitsandbytes (the `bench` extra); without it they are left out
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None

# W4A8's calibrated configuration (docs/quant.md, quality sweep)
CALIBRATED = dict(group_size=32, gptq=True, act_order=True, mse_clip=True)
LAYERS_ONLY = " (layers only)"
GKV = "growing_kv"  # column suffix: decode with infertrix.kvcache.GrowingKV (both arms)
MODULE = "module path"  # column suffix: decode without the engine (transformers' modules, our kernels)


def e2e_configs():
    """(name, factory(tok) -> transform | "nf4" | None); a name ending in LAYERS_ONLY reuses the
    '+ lm_head' model of the same name with the float (tied) head put back."""
    from infertrix.quant import W4A8, W4A16, W8A8

    return [
        ("fp32", None),
        ("W4A8 RTN g128 + lm_head", lambda tok: W4A8(group_size=128, quantize_lm_head=True)),
        # rotate=False: rotate="auto" would rotate with gptq=True, and the float tied head of the layers-only
        # row cannot undo a rotation folded into the embedding
        ("W4A8 calibrated g32 + lm_head", lambda tok: W4A8(**CALIBRATED, rotate=False, tokenizer=tok,
                                                         quantize_lm_head=True)),
        ("W4A8 calibrated g32" + LAYERS_ONLY, None),
        ("W4A8 GPTQ+rotation g32 + lm_head",
         lambda tok: W4A8(**CALIBRATED, rotate=True, tokenizer=tok, quantize_lm_head=True)),
        ("W4A8 GPTQ+rotation g32, lm_head float",
         lambda tok: W4A8(**CALIBRATED, rotate=True, tokenizer=tok, quantize_lm_head=False)),
        ("W4A16 RTN g32 (bf16)", lambda tok: W4A16(group_size=32)),
        ("W4A16 GPTQ g32 act_order (bf16)", lambda tok: W4A16(group_size=32, gptq=True, act_order=True, tokenizer=tok)),
        ("W8A8 SmoothQuant a=0.5", lambda tok: W8A8(smooth_alpha=0.5, tokenizer=tok)),
    ] + ([("bnb NF4 g64, lm_head float", lambda tok: "nf4")] if HAVE_BNB else [])


class NF4Linear(torch.nn.Module):
    """bitsandbytes NF4 weights (block 64) through ``bnb.matmul_4bit``: the baseline row only."""

    def __init__(self, lin: torch.nn.Linear):
        import bitsandbytes.functional as bf

        super().__init__()
        qw, self.state = bf.quantize_4bit(lin.weight.detach(), quant_type="nf4", blocksize=64)
        self.register_buffer("qw", qw)  # counted in the model's bytes (the state's absmax is not: ~3%)
        self.bias = lin.bias

    def forward(self, x):
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.qw.t(), quant_state=self.state, bias=self.bias)


def nf4_swap(model) -> None:
    from infertrix.core.model import decoder_layers

    for layer in decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], NF4Linear(mod))


def make_twin(name: str):
    """The '+ lm_head' transform of a layers-only config (its head is then put back in float)."""
    full = dict(e2e_configs())[name.removesuffix(LAYERS_ONLY) + " + lm_head"]
    return full(None)


def float_head(model) -> None:
    """Put back a float lm_head tied to the embedding (the layers-only variant)."""
    emb = model.get_input_embeddings().weight
    head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False)
    head.weight = emb
    model.lm_head = head


def e2e_quality(outdir: Path, only: list[str] | None, save) -> list[dict]:
    """Quantize (calibrating where asked), perplexity, model bytes; quantized models are saved
    (save_pretrained) for the speed part. Not a timing: run niced, outside the bench lock."""
    import infertrix as ix
    from infertrix import eval as ixe
    from infertrix.core.model import tensor_bytes

    rows = []
    last = None
    for name, make in e2e_configs():
        if only and not any(o in name for o in only):
            continue
        if name.endswith(LAYERS_ONLY):
            if last is None or not last[0].startswith(name.removesuffix(LAYERS_ONLY)):
                continue
            model, tok, qs = last[1], last[2], last[3]
            float_head(model)
        else:
            model, tok = ix.models.load("smollm2")
            t0 = time.perf_counter()
            t = make(tok) if make else None
            if t == "nf4":
                nf4_swap(model)
            elif t is not None:
                t.keep_original = False
                t.progress = True
                ix.optimize(model, t)
                model.save_pretrained(outdir / slug(name))
            qs = time.perf_counter() - t0
        ppl = ixe.perplexity(model, tok, max_tokens=4096)
        rows.append({"config": name, "perplexity": ppl,
                     "model MiB": tensor_bytes(model) / 2**20, "quantize s": qs})
        save(rows[-1])
        print(rows[-1], flush=True)
        last = (name, model, tok, qs)
        gc.collect()
    return rows


def e2e_speed(outdir: Path, threads_list: list[int], only: list[str] | None, save) -> list[dict]:
    """Decode/prefill tokens/s at each thread count and peak RSS, models loaded from e2e_quality's
    checkpoints (load_quantized: identical to the quantized models). Run under the bench lock."""
    import infertrix as ix
    from infertrix import eval as ixe
    from infertrix.quant import load_quantized

    rows = []
    for name, make in e2e_configs():
        if only and not any(o in name for o in only):
            continue
        model, tok = ix.models.load("smollm2")
        row = {"config": name, "speed of": "saved model"}
        ckpt = outdir / slug(name.removesuffix(LAYERS_ONLY) + (" + lm_head" if name.endswith(LAYERS_ONLY) else ""))
        tf = make(tok) if make is not None else None
        quantized = name.endswith(LAYERS_ONLY) or (tf is not None and tf != "nf4")
        loaded = False
        if tf == "nf4":
            nf4_swap(model)
        elif quantized and (ckpt / "config.json").exists():
            try:
                model, loaded = load_quantized(ckpt), True
            except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint still being written
                print(f"{name}: cannot load {ckpt} ({exc}); using its RTN twin", file=sys.stderr)
        if quantized and not loaded:
            # no checkpoint yet: the same layout quantized round-to-nearest (same shapes, groups and
            # kernels, so the same work per token; only the code values differ)
            tf = tf or make_twin(name)
            tf.gptq, tf.smooth_alpha, tf.keep_original, tf.progress = False, None, False, False
            if hasattr(tf, "mse_clip"):
                tf.mse_clip = False
            ix.optimize(model, tf)
            row["speed of"] = "RTN twin (same layout)"
        if name.endswith(LAYERS_ONLY):
            float_head(model)
        ix.optimize(model)  # optimize's defaults (the decode engine), where loading or quantizing did not add them
        gc.collect()

        def speeds():
            return {t: ixe.measure_speed(model, tok, prompt_tokens=256, new_tokens=64, repeats=3, threads=t)
                    for t in threads_list}

        sp, peak = ixe.peak_rss(speeds)
        for t in threads_list:
            row[f"decode tok/s {t}T"] = sp[t].decode_tokens_per_s
            row[f"prefill tok/s {t}T"] = sp[t].prefill_tokens_per_s
        engine = [t["report"] for t in ix.describe(model).to_dict()["transforms"] if t["name"] == "engine"]
        row["engine"] = engine[0].get("last_forward", "") if engine else "not added"
        # the same model on the module path: the engine taken off (the quantized layers stay: irreversible)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ix.restore(model)
        for t, r in speeds().items():
            row[f"decode tok/s {t}T {MODULE}"] = r.decode_tokens_per_s
        row["peak RSS MiB"] = peak / 2**20
        rows.append(row)
        save(row)
        print(row, flush=True)
        model = None
        gc.collect()
    return rows


RATIO_CONFIGS = ("W4A8 RTN g128 + lm_head", "W4A8 GPTQ+rotation g32 + lm_head")
SKINNY = "fp32 + skinny_linear"  # the same float model on infertrix::skinny_linear (not a quantization)


def decode_ratio(outdir: Path, threads_list: list[int], rounds: int) -> tuple[list[dict], list[dict]]:
    """The decode-speed ratio W4A8 / fp32, measured the way a ratio on a noisy 2-core VM must be: all
    models loaded at once, every (threads, cache) cell measured for each model in turn, round after
    round, one ratio per round; the table gives the median ratio and its min-max over rounds."""
    import infertrix as ix
    from infertrix import eval as ixe
    from infertrix.kvcache import GrowingKV
    from infertrix.quant import load_quantized

    models = {}
    for name in ("fp32", *RATIO_CONFIGS, SKINNY):
        if name == "fp32":
            model, tok = ix.models.load("smollm2")
        elif name == SKINNY:
            model = ix.models.load("smollm2")[0]
            ix.optimize(model, "skinny_linear")
        else:
            model = load_quantized(outdir / slug(name))
        models[name] = model
    caches = ("default", GKV)
    raw: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for t in threads_list:
            for cache in caches:
                for name, model in models.items():
                    if cache == GKV:
                        ix.optimize(model, GrowingKV())
                    sp = ixe.measure_speed(model, tok, prompt_tokens=256, new_tokens=64, repeats=1, threads=t)
                    if cache == GKV:
                        with warnings.catch_warnings():  # the loaded W4A8 transform stays (irreversible)
                            warnings.simplefilter("ignore")
                            ix.restore(model)
                        if name == SKINNY:
                            ix.optimize(model, "skinny_linear")
                    raw.setdefault((name, t, cache), []).append(sp.decode_tokens_per_s)
        print(f"round {r + 1}/{rounds}", {k: round(v[-1], 2) for k, v in raw.items()}, flush=True)
    rows = []
    for name in (*RATIO_CONFIGS, SKINNY):
        for t in threads_list:
            for cache in caches:
                ratios = [a / b for a, b in zip(raw[(name, t, cache)], raw[("fp32", t, cache)], strict=True)]
                rows.append({"config": name, "threads": t, "KV cache": cache,
                             "fp32 tok/s": statistics.median(raw[("fp32", t, cache)]),
                             "config tok/s": statistics.median(raw[(name, t, cache)]),
                             "ratio (median)": statistics.median(ratios),
                             "ratio min-max": f"{min(ratios):.2f}-{max(ratios):.2f}"})
    return rows, [{"cell": f"{k[0]} {k[1]}T {k[2]}", "tok/s per round": ", ".join(f"{v:.1f}" for v in vals)}
                  for k, vals in raw.items()]


# --- defaults: what `w4a8` should mean (issue #16). Every config is spelled out in full here, so
# the table keeps meaning the same thing when W4A8's defaults change.
RTN_G128 = dict(group_size=128, symmetric=False, mse_clip=False, rotate=False)  # the default until 2026-12


def defaults_configs() -> list[tuple[str, dict]]:
    """(name, W4A8 fields); quantize_lm_head is measured both ways on one quantized model."""
    gptq = dict(group_size=32, gptq=True, act_order=True, mse_clip=True, rotate=True)
    return [
        ("RTN g128 (old default)", RTN_G128),
        ("RTN g32", dict(RTN_G128, group_size=32)),
        ("RTN g32 mse_clip", dict(RTN_G128, group_size=32, mse_clip=True)),
        ("RTN g128 rotate", dict(RTN_G128, rotate=True)),
        ("RTN g32 rotate", dict(RTN_G128, group_size=32, rotate=True)),
        ("RTN g32 rotate mse_clip", dict(RTN_G128, group_size=32, rotate=True, mse_clip=True)),
        ("GPTQ g32 act_order mse_clip rotate, 8x256", dict(gptq, calibration_windows=8, window_tokens=256)),
        ("GPTQ g32 act_order mse_clip rotate, 16x256", dict(gptq, calibration_windows=16, window_tokens=256)),
    ]


PARIS = ("The capital of France is", " Paris")


@torch.no_grad()
def continuation_logprob(model, tok, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt), summed over the continuation's tokens (no chat template)."""
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(prompt + continuation, add_special_tokens=False).input_ids[len(p):]
    ids = torch.tensor([p + c])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
    return sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))


def float_head_for(model, emb: torch.Tensor, norm_weight: torch.Tensor, rotation_seed: int | None):
    """The float output projection that computes what the original tied head did on this (possibly
    rotated) model: the embedding, times the final norm weight and Q when rotated (rotation folds
    the final norm into the head and sets the norm to 1; infertrix.quant.rotation)."""
    from infertrix.quant.rotation import random_orthogonal

    w = emb.double()
    if rotation_seed is not None:
        w = (w * norm_weight.double()[None, :]) @ random_orthogonal(w.shape[1], rotation_seed)
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data.copy_(w.float())
    return head


def defaults_rows(max_tokens: int, only: list[str] | None, save) -> None:
    """Each config quantized once with lm_head (the calibration time includes the head's), then
    measured with the quantized head and again with the exact float head put back."""
    import infertrix as ix
    from infertrix import eval as ixe
    from infertrix.quant import W4A8
    from infertrix.quant.calibration import final_norm

    def measure(model, tok) -> tuple[float, float]:
        return ixe.perplexity(model, tok, max_tokens=max_tokens), continuation_logprob(model, tok, *PARIS)

    for name, fields in [("fp32", None), *defaults_configs()]:
        if only and not any(o in name for o in only):
            continue
        model, tok = ix.models.load("smollm2")
        row: dict = {"config": name, "load avg (1 min)": _loadavg(), "threads": torch.get_num_threads()}
        if fields is None:
            row["ppl, lm_head float"], row["log P(Paris), lm_head float"] = measure(model, tok)
        else:
            emb = model.get_input_embeddings().weight.detach().clone()
            norm_w = final_norm(model).weight.detach().clone()
            t = W4A8(**fields, quantize_lm_head=True, progress=True, keep_original=False, tokenizer=tok)
            t0, c0 = time.perf_counter(), time.process_time()
            ix.optimize(model, t)
            row["quantize s (wall)"] = time.perf_counter() - t0
            row["quantize s (CPU)"] = time.process_time() - c0  # less dependent on the machine's load
            row["ppl, lm_head int4"], row["log P(Paris), lm_head int4"] = measure(model, tok)
            model.lm_head = float_head_for(model, emb, norm_w, t.rotation_seed if t.rotate else None)
            row["ppl, lm_head float"], row["log P(Paris), lm_head float"] = measure(model, tok)
        row["load avg (1 min)"] = f"{row['load avg (1 min)']:.1f}-{_loadavg():.1f}"
        save(row)
        print(row, flush=True)
        gc.collect()


def _loadavg() -> float:
    return os.getloadavg()[0]


def defaults_table(saved: dict, max_tokens: int) -> str:
    base = saved.get("fp32", {}).get("ppl, lm_head float")
    order = ["fp32"] + [n for n, _ in defaults_configs()]
    rows = []
    for name in order:
        r = dict(saved.get(name, {}))
        if not r:
            continue
        for head in ("int4", "float"):
            if base and f"ppl, lm_head {head}" in r:
                r[f"ppl vs fp32, lm_head {head}"] = f"{100 * (r[f'ppl, lm_head {head}'] / base - 1):+.1f}%"
        rows.append(r)
    cols = ["config", "ppl, lm_head int4", "ppl vs fp32, lm_head int4", "log P(Paris), lm_head int4",
            "ppl, lm_head float", "ppl vs fp32, lm_head float", "log P(Paris), lm_head float", "quantize s (wall)",
            "quantize s (CPU)", "threads", "load avg (1 min)"]
    return ("### W4A8 defaults on SmolLM2-135M-Instruct: cheap (no data) and calibrated candidates\n\n"
            f"Perplexity on the first {max_tokens} tokens of *Pride and Prejudice* (512-token windows); "
            "log P(\" Paris\" | \"The capital of France is\") without chat template. Each config is quantized "
            "once with `quantize_lm_head=True` (its time includes the head: RTN, or GPTQ on the head too) "
            "and measured with the int4 head, then with the exact float head put back (the tied embedding; "
            "rotated by the same Q when `rotate`). Calibration: windows from the END of the book "
            "(`calibration_windows x window_tokens` tokens). `quantize s`: wall time of `optimize` (model already loaded; "
            "torch threads as shown); this 2-core machine is shared, so times are as measured under the load "
            "shown (1-minute load average before-after; 2.0 = both cores busy); `quantize s (CPU)`: the process's "
            "CPU time, steadier under load (blank: measured before it was recorded).\n\n" + markdown_table(rows, cols))


def _kernel_calls(layers, xs, kind: str) -> list:
    """(op, arguments) per FlattenLinear in ``layers`` on ``xs``. ``kind``: ``per-token``
    (``w8a8_linear`` on the same int8 weights and scales: the same bytes streamed), ``flattened``
    (its own kernel), ``unflattened`` (its kernel with no flattened channel: their cost apart)."""
    from infertrix.ops.w8a8_flat import pack_scales

    calls = []
    for lin, x in zip(layers, xs, strict=True):
        b = lin._buffers
        if kind == "per-token":
            calls.append((torch.ops.infertrix.w8a8_linear.default, (x, b["qweight"], lin.scale.clone(), b["bias"])))
        elif kind == "flattened":
            calls.append((torch.ops.infertrix.w8a8_flat_linear.default, lin.kernel_args(x)))
        else:
            calls.append((torch.ops.infertrix.w8a8_flat_linear.default,
                          (x, b["qweight"], pack_scales(lin.flat[:1], lin.scale), b["bias"])))
    return calls


def _flatten_decode(full: dict, rounds: int) -> list[dict]:
    """Greedy decode on the engine (prompt 40, 64 new tokens) of the two models, alternating, at batch
    1 and 4 and 1 and 2 threads: one ratio per round, the median and its range."""
    from infertrix.engine import engine_runtime
    from infertrix.eval import measure_speed

    names, rows = list(full), []
    before = {}
    for n, (model, _) in full.items():
        assert engine_runtime(model).report()["model"] == "supported", engine_runtime(model).report()
        before[n] = engine_runtime(model).report()["module_forwards"]  # perplexity's windows run there
    for batch in (1, 4):
        for threads in (1, 2):
            tps: dict[str, list[float]] = {n: [] for n in names}
            for r in range(rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    model, tok = full[n]
                    sp = measure_speed(model, tok, prompt_tokens=40, new_tokens=64, repeats=1, batch_size=batch,
                                       threads=threads)
                    tps[n].append(sp.decode_tokens_per_s)
            ratios = [b / a for a, b in zip(tps[names[0]], tps[names[1]], strict=True)]
            rows.append({"engine decode": f"batch {batch}, {threads} thread(s)",
                         **{f"{n} tok/s": round(statistics.median(v), 1) for n, v in tps.items()},
                         "flattened / per-token": round(statistics.median(ratios), 3),
                         "min-max": f"{min(ratios):.3f}-{max(ratios):.3f}"})
            print(rows[-1], flush=True)
    for n, (model, _) in full.items():  # every decode forward ran on the engine
        assert engine_runtime(model).report()["module_forwards"] == before[n], engine_runtime(model).report()
    return rows


def flatten_rows(tokens: int, rounds: int, ms: list[int]) -> tuple[list[dict], list[dict], list[dict]]:
    """FlattenQuant (per-tensor static int8 activations) against per-token W8A8, both SmoothQuant 0.5
    calibrated on the same windows: perplexity, and every quantized layer of each model called in a
    row (cold weights: 134+ MB) at M rows, the models alternating, ``rounds`` rounds, medians."""
    import infertrix as ix
    import infertrix.eval as ixe
    from infertrix.quant import W8A8, FlattenLinear, FlattenQuant, W8A8Linear

    torch.set_num_threads(1)
    models, quality, full = {}, [], {}
    for name, config, kind in (("w8a8 (per-token)", W8A8(progress=False), W8A8Linear),
                               ("flattenquant (per-tensor static)", FlattenQuant(progress=False), FlattenLinear)):
        model, tok = ix.models.load("smollm2")
        t0 = time.perf_counter()
        ix.optimize(model, config)
        took = time.perf_counter() - t0
        layers = [m for m in model.modules() if isinstance(m, kind)]
        extra = sum(getattr(m, "extra_channels", 0) * m.out_features for m in layers)
        base = sum(m.in_features * m.out_features for m in layers)
        ppl = ixe.perplexity(model, tok, max_tokens=tokens)
        quality.append({"config": name, "perplexity": ppl, "flattened extra channels %": 100 * extra / base,
                        "int8 weight MiB": sum(m.qweight.numel() for m in layers) / 2**20, "calibrate s": took})
        print(quality[-1], flush=True)
        models[name] = layers
        full[name] = (model, tok)
    quality[1]["vs per-token %"] = 100 * (quality[1]["perplexity"] / quality[0]["perplexity"] - 1)
    decode = _flatten_decode(full, rounds=max(5, rounds // 4))
    speed = []
    with torch.inference_mode():
        for m in ms:
            xs = {n: [torch.randn(m, lin.in_features) for lin in layers] for n, layers in models.items()}
            names = list(models)
            flat = models[names[1]]
            calls = {f"{names[0]} module": [(lin, (x,)) for lin, x in zip(models[names[0]], xs[names[0]], strict=True)],
                     f"{names[1]} module": [(lin, (x,)) for lin, x in zip(flat, xs[names[1]], strict=True)],
                     **{f"{k} kernel": _kernel_calls(flat, xs[names[1]], k)
                        for k in ("per-token", "flattened", "unflattened")}}
            times: dict[str, list[float]] = {n: [] for n in calls}
            order = random.Random(m)
            for _ in range(rounds):
                for n in order.sample(list(calls), len(calls)):
                    t0 = time.perf_counter()
                    for fn, args in calls[n]:
                        fn(*args)
                    times[n].append(time.perf_counter() - t0)
            med = {n: statistics.median(v) for n, v in times.items()}
            row = {"M": m, **{f"{n} ms": round(1e3 * t, 2) for n, t in med.items()}}
            for part, (a, b) in (("kernels, same weights", ("per-token kernel", "flattened kernel")),
                                 ("no flattened channel", ("per-token kernel", "unflattened kernel")),
                                 ("modules", tuple(f"{n} module" for n in names))):
                ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
                row[f"{part}: per-token / flattened"] = round(statistics.median(ratios), 3)
                row[f"{part} min-max"] = f"{min(ratios):.3f}-{max(ratios):.3f}"
            speed.append(row)
            print(speed[-1], flush=True)
    return quality, decode, speed


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["kernels", "skinny", "quality", "speed", "table", "ratio", "defaults",
                                                 "defaults-table", "flatten"], default="kernels",
                    help="kernels: the kernel table (locked); quality: quantize, perplexity and save the "
                    "models (niced, unlocked); speed: end-to-end decode speed of the saved models (locked); "
                    "table: write the end-to-end section from results.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--models", default="bench-out/quant-models", help="where quality saves the quantized models")
    ap.add_argument("--only", nargs="*", help="configs whose name contains one of these")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="threads for the end-to-end decode")
    ap.add_argument("--rounds", type=int, default=5, help="ratio: interleaved rounds")
    ap.add_argument("--tokens", type=int, default=2048, help="defaults: perplexity tokens")
    args = ap.parse_args(argv)
    import infertrix

    print(infertrix.ops.status())
    outdir = Path(args.models)
    outdir.mkdir(parents=True, exist_ok=True)
    if args.part == "kernels":
        torch.set_num_threads(1)
        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e9:.1f} GB/s")
        if args.quick:
            rows = kernel_rows([1], [1, 32], [(576, 576), (4096, 4096)], bw, with_bnb=False)
        else:
            rows = kernel_rows([1, 2], [1, 8, 32, 128], SMOL_SHAPES + BIG_SHAPES, bw)
        cold = cold_row(bw)
        print(cold)
        cols = ["threads", "M", "N", "K", "fp32 us", "bf16 us", "torch int4 us", "bnb nf4 us", "w4a8 us", "vs fp32",
                "vs torch int4", "floor us", "% of floor"]
        text = (f"### Kernel: `infertrix::w4a8_linear` (group 128, zero points)\n\nMeasured copy bandwidth: "
                f"{bw / 1e9:.1f} GB/s (1 thread). Times in microseconds, median; weights hot in cache "
                "unless marked cold.\n\n" + markdown_table(rows, cols) + "\n" + markdown_table(
                    [cold], ["threads", "M", "N", "K", "fp32 us", "w4a8 us", "vs fp32", "floor us", "% of floor",
                             "note"]))
        print(text)
        if not args.no_write:
            write_section("quant", "quant: W4A8 kernel", text)
        return
    if args.part == "skinny":
        torch.set_num_threads(1)
        bw = copy_bandwidth()
        rows = skinny_rows(args.threads, [1, 2, 4, 8, 16, 32], SMOL_SHAPES + BIG_SHAPES[:1], bw)
        text = (f"### Kernel: `infertrix::skinny_linear` against `F.linear`, float32\n\nSame weights, M rows of "
                f"activations. Measured copy bandwidth: {bw / 1e9:.1f} GB/s (1 thread); floor = float32 weight "
                "bytes over it (weights hot in cache where they fit, so small layers can beat it). Times in "
                "microseconds, median.\n\n" + markdown_table(rows, list(rows[0])))
        print(text)
        if not args.no_write:
            write_section("quant-skinny", "quant: Skinny float32 kernel", text)
        return
    if args.part == "flatten":
        quality, decode, speed = flatten_rows(args.tokens, args.rounds, [1, 4, 16])
        text = ("### FlattenQuant (per-tensor static int8 activations) against per-token W8A8, SmolLM2\n\n"
                f"Both SmoothQuant alpha 0.5, calibrated on the same 16 x 256 tokens from the end of the book; "
                f"perplexity on the first {args.tokens} tokens of *Pride and Prejudice* (512-token windows). Kernel: "
                "every quantized layer of a model called once in a row on random activations of M rows (1 "
                "thread; 210 layers, cold weights). *Kernels, same weights*: `w8a8_linear` and "
                "`w8a8_flat_linear` each called on the FlattenQuant model's int8 weights and scales (the same "
                "bytes streamed; arguments gathered beforehand, so both pay the same Python per call). "
                "*Modules*: each model's own layers called as `layer(x)` (two models' weights: where each "
                "lies in memory moves a pass by up to 25% between runs). *No flattened channel*: the "
                "flattened kernel with F = 0 on the same weights (the flattened channels' cost apart). "
                "The five passes in a shuffled "
                f"order each round, {args.rounds} rounds, median; the ratios are per round. 2 cores; 1-minute load average {os.getloadavg()[0]:.1f} at the end.\n\n"
                + markdown_table(quality, list(quality[1])) + "\n" + markdown_table(speed, list(speed[0]))
                + "\n*Engine decode*: `model.generate` on the decode engine (both models' every layer runs "
                "there since FlattenLinear got its engine kind), greedy, prompt 40, 64 new tokens, the "
                f"two models alternating, {max(5, args.rounds // 4)} rounds, one ratio per round:\n\n"
                + markdown_table(decode, list(decode[0])))
        print(text)
        if not args.no_write:
            write_section("quant-flatten", "quant: FlattenQuant against per-token W8A8", text,
                          command=f"python -m benchmarks.quant --part flatten --tokens {args.tokens} --rounds {args.rounds}")
        return
    # results.json gathers both parts, row by row (quality runs may go in parallel processes)
    results = outdir / "results.json"

    def save(row: dict) -> dict:
        saved = json.loads(results.read_text()) if results.exists() else {}
        saved.setdefault(row["config"], {}).update(row)
        results.write_text(json.dumps(saved, indent=1))
        return saved

    if args.part == "quality":
        e2e_quality(outdir, args.only, save)
        return
    if args.part in ("defaults", "defaults-table"):  # measure (rows appended), or only print/write
        results = outdir / f"defaults-{args.tokens}.json"
        if args.part == "defaults":
            defaults_rows(args.tokens, args.only, save)
        text = defaults_table(json.loads(results.read_text()), args.tokens)
        print(text)
        if not args.no_write:
            write_section("quant-defaults", "quant: W4A8 defaults (cheap and calibrated)", text,
                          command=f"python -m benchmarks.quant --part defaults --tokens {args.tokens} [--only NAME] "
                          "(rows gathered in the results file, one config per run), then --part defaults-table")
        return
    if args.part == "ratio":
        rows, raw = decode_ratio(outdir, args.threads, args.rounds)
        text = ("### Decode speed-up of W4A8 (+ lm_head) over float32, interleaved\n\nRow `fp32 + skinny_linear`: "
                "the float32 model itself on the Skinny kernels (`infertrix::skinny_linear`, no quantization). "
                "All models loaded at once "
                "(saved checkpoints, `load_quantized`); in each round every (threads, KV cache) cell is measured "
                "for each model in turn (greedy `generate`, 256-token prompt, 64 new tokens, batch 1); one ratio "
                f"per round, {args.rounds} rounds: median and min-max. KV cache `default`: transformers' "
                "DynamicCache (a `torch.cat` of the whole cache per token); `growing_kv`: "
                "`infertrix.kvcache.GrowingKV` on both models (bit-identical outputs).\n\n"
                + markdown_table(rows, list(rows[0])) + "\n" + markdown_table(raw, list(raw[0])))
        print(text)
        if not args.no_write:
            write_section("quant-ratio", "quant: W4A8 decode speed-up, interleaved", text)
        return
    saved = json.loads(results.read_text()) if results.exists() else {}
    if args.part == "speed":  # "table": write the section from results.json as it stands
        e2e_speed(outdir, args.threads, args.only, save)
        saved = json.loads(results.read_text())
    base = saved.get("fp32", {})
    for r in saved.values():
        for t in args.threads:
            for key in (f"decode tok/s {t}T", f"decode tok/s {t}T {MODULE}"):
                if key in r and key in base:
                    r[key.replace("decode tok/s", "vs fp32")] = r[key] / base[key]
    base_ppl = saved.get("fp32", {}).get("perplexity")
    for r in saved.values():
        if base_ppl and "perplexity" in r:
            r["ppl vs fp32 %"] = 100 * (r["perplexity"] / base_ppl - 1)
    order = [name for name, _ in e2e_configs()]
    rows = sorted(saved.values(), key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
    cols = ["config", "speed of", "engine"] + [f"{k} {t}T" for t in args.threads for k in ("decode tok/s", "vs fp32")] + [
        f"{k} {t}T {MODULE}" for t in args.threads for k in ("decode tok/s", "vs fp32")] + [
        f"prefill tok/s {args.threads[0]}T", "perplexity", "ppl vs fp32 %", "model MiB", "peak RSS MiB", "quantize s"]
    text = ("### End to end: SmolLM2-135M-Instruct\n\nDecode: greedy `generate`, 256-token prompt, 64 new tokens, "
            "batch 1, median of 3, at 1 and 2 threads (T). Perplexity on 4096 tokens of *Pride and Prejudice* "
            "(512-token windows); calibration on 16 x 256 tokens from the end of the book. Float layers freed "
            "after quantization (keep_original=False). Quality (`--part quality`, perplexity, model size, "
            "quantize time) is measured outside the bench lock and saves each quantized model; speed "
            "(`--part speed`, under the lock) loads those checkpoints with `load_quantized`. Peak RSS: the "
            "process's high-water mark during that config's speed runs. Every model decodes with `optimize`'s "
            "defaults, the decode engine (fp32 included; column `engine`: the path its last forward took; a kind "
            "the engine lacks runs the module path and says so); columns marked module path: the same model "
            "again with the engine taken off (transformers' modules around our kernels), fp32 included, so "
            "each ratio compares like with like. Without a checkpoint from `--part quality` a row is timed on "
            "its round-to-nearest twin (same layout and kernels, so the same work per token).\n\n"
            + markdown_table(rows, cols))
    print(text)
    if not args.no_write:
        write_section("quant-e2e", "quant: SmolLM2 end to end", text)


if __name__ == "__main__":
    main(sys.argv[1:])
