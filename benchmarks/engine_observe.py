"""KV policies that read attention while decoding (H2O, decode_interval compressions), on the decode
engine against the module path: SmolLM2 W4A8, a 200-token prompt, per-token decode time (the time of
33 new tokens minus that of 1, over 32), alternating rounds, medians.

    python benchmarks/engine_observe.py "h2o:0.5" "snapkv(compression=0.5,window_size=32,decode_interval=8)"
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import infertrix as ix


def main(policies: list[str], rounds: int = 3, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    models = {}
    for policy in policies:
        for engine in (False, True):
            model, tok = ix.models.load("smollm2")
            models[policy, engine] = ix.optimize(model, "w4a8", policy, *(["engine"] if engine else []))
    ids = tok("The history of the city " * 40, return_tensors="pt").input_ids[:, :200]

    def seconds(model, n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        return time.perf_counter() - t0

    runs: dict = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            runs[key].append((seconds(model, 33) - seconds(model, 1)) / 32)
    print("| policy | module path ms/token | engine ms/token | speed-up |\n|---|---|---|---|")
    for policy in policies:
        module, engine = (1000 * statistics.median(runs[policy, e]) for e in (False, True))
        print(f"| `{policy}` | {module:.2f} | {engine:.2f} | {module / engine:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
