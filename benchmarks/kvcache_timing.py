"""Seconds per RULER sample of our policies at batch 1, timed the way benchmarks/kvpress_ruler.py times kvpress.

    flock /tmp/infertrix-bench.lock taskset -c 0 .venv/bin/python -m benchmarks.kvcache_timing \\
        --tasks niah_single_1 niah_multikey_1 --samples 5 --methods full SnapKV StreamingLLM KeyDiff KVzip
    flock /tmp/infertrix-bench.lock taskset -c 0 benchmarks/.venv-kvpress/bin/python -m benchmarks.kvpress_ruler \\
        --tasks niah_single_1 niah_multikey_1 --samples 5 --presses full SnapKV StreamingLLM KeyDiff KVzip \\
        --out bench-out/ruler/timing-kvpress.json
    python -m benchmarks.kvcache_compare --ours bench-out/ruler/timing-ours.json \\
        --kvpress bench-out/ruler/timing-kvpress.json --section kvcache-kvpress-timing

benchmarks/kvcache_ruler.py prefills each micro-batch of samples once and replays that prefill under
every method, so its seconds per sample mix a shared prefill, a replay and a batch of rows: right for
scores, not for comparing speed with kvpress. Here each sample runs alone, from scratch, the steps
kvpress's ``answer`` times (benchmarks/kvpress_ruler.py): the context prefilled under the method into a
fresh cache (``infertrix.optimize(model, method)``, so decoding runs on our engine where it can), the
question fed uncompressed at positions continuing from the context's length, greedy decoding of at most
``--max-new`` tokens to EOS. ``times`` holds every sample's wall seconds (the cache's bytes are read
after the context inside the timer, as kvpress_ruler.py reads kvpress's); the compare table averages
each task's median. Run both sides on the same core, one after the other, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import ruler_samples as rs


def policy_of(name: str, ratio: float):
    """(our label as benchmarks/kvcache_ruler.py writes it, the transform or None for the full cache):
    the cell benchmarks/kvcache.py builds for class name ``name``."""
    from benchmarks.kvcache import cells

    if name == "full":
        return "full cache", None
    label, _, _, policy, _ = cells([ratio], 256, [name])[1]
    return label, policy


@torch.no_grad()
def answer(model, compressed: bool, ctx_ids, q_ids, steps: int, eos: int) -> tuple[list[int], float, int]:
    """(greedy answer ids, seconds, cache bytes after the context): one context and question, from a
    fresh cache (the policy's when ``compressed``, else transformers' DynamicCache)."""
    from transformers import DynamicCache

    from benchmarks.kvcache_ruler import cache_bytes
    from infertrix.kvcache import new_cache

    t0 = time.perf_counter()
    cache = new_cache(model) if compressed else DynamicCache(config=model.config)
    model(ctx_ids, cache=cache, logits_to_keep=1)
    kv = cache_bytes(cache)
    if compressed:
        cache.policy = None  # the question is not compressed (kvpress's protocol)
    n = ctx_ids.shape[1]
    pos = torch.arange(n, n + q_ids.shape[1]).unsqueeze(0)
    out = model(q_ids, cache=cache, position_ids=pos, logits_to_keep=1)
    ids = [int(out.logits[0, -1].argmax())]
    pos = pos[:, -1:]
    while ids[-1] != eos and len(ids) < steps:
        pos = pos + 1
        out = model(torch.tensor([[ids[-1]]]), cache=cache, position_ids=pos)
        ids.append(int(out.logits[0, -1].argmax()))
    return [i for i in ids if i != eos], time.perf_counter() - t0, kv


def run_task(model, tok, samples, methods, ratio, kind, steps, metric, log) -> dict:
    """{label: {press, ratio, score, s, times, preds}} for one task's samples, each run alone."""
    import infertrix as ix

    parts = [rs.split_question(s["input"], kind) for s in samples]
    ids = [(torch.tensor([tok(c).input_ids]), torch.tensor([tok(q, add_special_tokens=False).input_ids]))
           for c, q in parts]
    refs = [s["outputs"] for s in samples]
    res = {}
    for name in methods:
        label, policy = policy_of(name, ratio)
        ix.restore(model)
        ix.optimize(model, *([policy] if policy is not None else []))
        times, preds, kv = [], [], []
        for c_ids, q_ids in ids:
            gen, s, held = answer(model, policy is not None, c_ids, q_ids, steps, tok.eos_token_id)
            times.append(s)
            kv.append(held)
            preds.append(rs.postprocess(tok.decode(gen, skip_special_tokens=True)))
        res[label] = {"press": name, "ratio": 0.0 if policy is None else ratio, "score": metric(preds, refs),
                      "s": sum(times) / len(times), "times": times, "kv": sum(kv) / len(kv), "preds": preds}
        log(f"  {label}: {res[label]['score']:.1f}  (median {sorted(times)[len(times) // 2]:.2f} s/sample)")
    return res


def main(argv: list[str] | None = None) -> None:
    from infertrix.models import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=rs.ROOT / "bench-out" / "ruler")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--tasks", nargs="*", default=["niah_single_1", "niah_multikey_1"])
    ap.add_argument("--samples", type=int, default=5, help="samples per task (the first N of each file)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--methods", nargs="*", default=["full", "SnapKV", "StreamingLLM", "KeyDiff", "KVzip"],
                    help="'full' or our class names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new", type=int, default=16, help="cap on RULER's tokens_to_generate")
    ap.add_argument("--out", type=Path, default=None, help="default: <data>/timing-ours.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = rs.stamped_log()
    kinds, metrics, gen_config = rs.ruler_setup()
    model, tok = load("smollm2")
    out = args.out or args.data / "timing-ours.json"
    results = {}
    for task in args.tasks:
        kind = kinds[task]
        samples = rs.load_samples(args.data, args.length, task, args.samples)
        steps = min(args.max_new, gen_config[kind]["tokens_to_generate"])
        log(f"{task}: {len(samples)} samples, {len(args.methods)} methods, each sample alone")
        results[task] = run_task(model, tok, samples, args.methods, args.ratio, kind, steps, metrics[kind], log)
        out.write_text(json.dumps(results, indent=1))
    log(f"done: {out}")


if __name__ == "__main__":
    main()
