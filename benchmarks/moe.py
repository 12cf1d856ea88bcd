"""MoE expert offloading: tokens/s, peak memory, bytes read and hit rate against accelerate's disk
offload and the model fully in memory.

    flock /tmp/infertrix-bench.lock python -m benchmarks.moe [--quick] [--models real,random]

Models (built once, cached under ~/.cache/infertrix/moe/):
- ``real``: SmolLM2-135M upcycled into a Mixtral MoE, 8 experts of split MLP neurons per layer,
  top-2, router fitted on 2048 tokens of Pride and Prejudice (``infertrix.moe.upcycle``); 30 layers
  x 8 experts x 1.33 MB = 318 MB of experts.
- ``random``: a random-weight Mixtral, 10 layers x 8 experts x 25.2 MB = 2.0 GB of experts.

Each configuration runs in its own subprocess (so peak RSS is its own): the prompt (prose that
follows the router's calibration text) is prefilled, then the next tokens of the same prose are
fed one at a time (teacher forcing, so routing follows real text) and timed; statistics count
those decode steps only. Every run compares its step logits with the in-memory run's. The
offloaded runs build the model with ``load_offloaded`` (experts never all in memory) and start
with the store's pages dropped from the page cache; the store drops pages after every read.
accelerate's disk offload (``device_map`` with the experts on ``"disk"``) gets the same
treatment: its offload files' pages are dropped after each experts call, so both read the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(os.environ.get("INFERTRIX_CACHE", Path.home() / ".cache" / "infertrix")) / "moe"
THREADS = 2
CALIB_TOKENS = 2048


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def _prose_ids(n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "smollm2-8x-split")
    text = (Path(__file__).resolve().parent.parent / "src/infertrix/data/prideprejudice.txt").read_text()
    ids = tok(text[: (CALIB_TOKENS + n) * 8], return_tensors="pt").input_ids
    return ids[:, CALIB_TOKENS : CALIB_TOKENS + n]  # after the router's calibration text


# -- model preparation (main process) ----------------------------------------------------------
def build_real() -> Path:
    out = ROOT / "smollm2-8x-split"
    if (out / "config.json").exists():
        return out
    from infertrix import models
    from infertrix.moe.upcycle import calibration_ids, upcycle

    dense, tok = models.load("smollm2")
    moe = upcycle(dense, 8, 2, "split", calibration_ids=calibration_ids(tok, CALIB_TOKENS))
    moe.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_random() -> Path:
    out = ROOT / "random-2g"
    if (out / "config.json").exists():
        return out
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=49152, hidden_size=1024, intermediate_size=2048, num_hidden_layers=10,
        num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=True, max_position_embeddings=4096, sliding_window=None,
    )
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
                if name.endswith("mlp.gate.weight"):
                    p.mul_(8.0)  # decisive routing, as trained routers are
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.save_pretrained(out)
    return out


# -- one configuration (worker subprocess) -------------------------------------------------------
def _accelerate_model(ckpt: Path, folder: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt)
    dmap = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(cfg.num_hidden_layers):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
            dmap[f"model.layers.{i}.{part}"] = "cpu"
        dmap[f"model.layers.{i}.mlp.experts"] = "disk"
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map=dmap, offload_folder=folder, dtype=torch.float32)
    fds: dict[int, list[int]] = {}
    for i in range(cfg.num_hidden_layers):
        fds[i] = [os.open(p, os.O_RDONLY) for p in Path(folder).glob(f"model.layers.{i}.mlp.experts.*")]
        if not fds[i]:
            raise RuntimeError(f"accelerate wrote no offload files for layer {i} in {folder}")

        def drop(_m, _a, _o, i=i):  # honest reads: the next call reads the disk again
            for fd in fds[i]:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        model.model.layers[i].mlp.experts.register_forward_hook(drop)
        drop(None, None, None)
    return model.eval()


def run_one(spec: dict) -> dict:
    torch.set_num_threads(THREADS)
    # the runtime: Python, torch, transformers and the model's code, before any weight is loaded
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import infertrix as ix
    from infertrix.core.model import tensor_bytes
    from infertrix.moe import ExpertOffload, load_offloaded, offload_runtime

    rss_runtime = _rss()
    ckpt = Path(spec["ckpt"])
    kind = spec["kind"]
    tmp = tempfile.mkdtemp(prefix="moe-bench-")
    t0 = time.perf_counter()
    if kind == "memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    elif kind == "accelerate":
        model = _accelerate_model(ckpt, tmp)
    else:
        off = ExpertOffload(
            budget=spec["budget"], policy=spec.get("policy", "lru"), prefetch=spec["prefetch"],
            miss_policy=spec.get("miss_policy", "fetch"), store_dir=str(Path(spec["store"])),
        )
        model = load_offloaded(ckpt, off)
        offload_runtime(model).cache.store.drop_page_cache()
    load_s = time.perf_counter() - t0
    ids = torch.load(spec["ids"])
    prompt, steps = ids[:, : spec["prompt"]], spec["steps"]
    rt = offload_runtime(model) if kind == "offload" else None
    # each step's logits go straight to a file (compared by the driver), not into memory
    with torch.no_grad(), open(spec["logits_out"], "wb") as logits_file:
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        logits_file.write(out.logits[0, -1].numpy().tobytes())
        if rt is not None:
            rt.cache.reset_stats()
        read0 = _read_bytes()
        t0 = time.perf_counter()
        for s in range(steps):
            tok = ids[:, spec["prompt"] + s : spec["prompt"] + s + 1]
            out = model(tok, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits_file.write(out.logits[0, -1].numpy().tobytes())
        decode_s = time.perf_counter() - t0
        disk_read = _read_bytes() - read0
    stats = rt.cache.stats() if rt is not None else None
    res = {
        "name": spec["name"], "kind": kind, "steps": steps, "load_s": load_s, "prefill_s": prefill_s,
        "tokens_per_s": steps / decode_s, "disk_read_mib_per_token": disk_read / 2**20 / steps,
        "rss_runtime": rss_runtime, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if kind == "memory":
        res["dense_bytes"] = tensor_bytes(model) - sum(
            m.gate_up_proj.nbytes + m.down_proj.nbytes for m in model.modules() if hasattr(m, "gate_up_proj")
        )
    if rt is not None:
        res.update(
            hit_rate=stats.hit_rate, prefetch_used=stats.prefetch_used, prefetched=stats.prefetched,
            store_mib_per_token=stats.bytes_read / 2**20 / steps, stall_s_per_token=stats.stall_seconds / steps,
            budget_bytes=rt.cache.budget_bytes, capacity=rt.cache.capacity, dense_bytes=tensor_bytes(model),
            in_place=stats.computed_in_place,
        )
        ix.restore(model) if spec.get("restore") else None
        if rt.prefetcher is not None:
            rt.prefetcher.stop()
    return res


# -- driver -------------------------------------------------------------------------------------
def configs(quick: bool, which: str) -> list[dict]:
    real_steps, rand_steps = (16, 3) if quick else (32, 4)
    acc_real, acc_rand = (4, 1) if quick else (6, 1)
    out = []
    if which in ("real", "all"):
        out += [
            dict(model="real", name="in memory", kind="memory", steps=real_steps),
            dict(model="real", name="offload 50% LRU", kind="offload", budget=0.5, prefetch=False, steps=real_steps),
            dict(model="real", name="offload 50% LRU+prefetch", kind="offload", budget=0.5, prefetch=True, steps=real_steps),
            dict(model="real", name="offload 25% LRU", kind="offload", budget=0.25, prefetch=False, steps=real_steps),
            dict(model="real", name="offload 25% LFU", kind="offload", budget=0.25, prefetch=False, policy="lfu", steps=real_steps),
            dict(model="real", name="offload 25% LRU+prefetch", kind="offload", budget=0.25, prefetch=True, steps=real_steps),
            dict(model="real", name="offload 25% LRU+prefetch, miss=auto", kind="offload", budget=0.25, prefetch=True,
                 miss_policy="auto", steps=real_steps),
            dict(model="real", name="accelerate disk offload", kind="accelerate", steps=acc_real),
        ]
    if which in ("random", "all"):
        out += [
            dict(model="random", name="in memory", kind="memory", steps=rand_steps),
            dict(model="random", name="offload 50% LRU+prefetch", kind="offload", budget=0.5, prefetch=True, steps=rand_steps),
            dict(model="random", name="offload 25% LRU", kind="offload", budget=0.25, prefetch=False, steps=rand_steps),
            dict(model="random", name="offload 25% LRU+prefetch", kind="offload", budget=0.25, prefetch=True, steps=rand_steps),
            dict(model="random", name="accelerate disk offload", kind="accelerate", steps=acc_rand),
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer decode steps")
    ap.add_argument("--models", default="all", choices=("all", "real", "random"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_one(json.loads(args.worker))), flush=True)
        return

    from benchmarks.report import markdown_table, write_section
    from infertrix.moe import ExpertStore

    torch.set_num_threads(THREADS)
    ROOT.mkdir(parents=True, exist_ok=True)
    ckpts = {}
    if args.models in ("real", "all"):
        ckpts["real"] = build_real()
    if args.models in ("random", "all"):
        ckpts["random"] = build_random()
    prompt = 32
    steps_max = 128
    ids_file = ROOT / "prose_ids.pt"
    torch.save(_prose_ids(prompt + steps_max + 1), ids_file)
    for ck in ckpts.values():
        store = ROOT / f"{ck.name}-store"
        if not (store / "manifest.json").exists():
            ExpertStore.from_checkpoint(ck, store).close()
    results: dict[str, list[dict]] = {}
    for spec in configs(args.quick, args.models):
        ck = ckpts[spec["model"]]
        ref_file = ROOT / f"{ck.name}-logits-ref.f32"
        spec.update(ckpt=str(ck), store=str(ROOT / f"{ck.name}-store"), ids=str(ids_file), prompt=prompt,
                    logits_out=str(ref_file if spec["kind"] == "memory" else ROOT / "logits-run.f32"))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.moe", "--worker", json.dumps(spec)],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            raise SystemExit(f"worker {spec['model']}/{spec['name']} failed")
        r = json.loads(line[0][7:])
        r["wall_s"] = time.perf_counter() - t0
        if spec["kind"] != "memory":
            got = np.fromfile(spec["logits_out"], dtype=np.float32).reshape(r["steps"] + 1, -1)
            ref = np.fromfile(ref_file, dtype=np.float32).reshape(-1, got.shape[1])[: got.shape[0]]
            r["max_abs_logit_diff"] = float(np.abs(got - ref).max())
            r["argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        results.setdefault(spec["model"], []).append(r)
        print(json.dumps(r), flush=True)

    body = [__doc__.split("\n\n", 2)[2].strip(), ""]
    mib = 1 / 2**20
    for model, rows in results.items():
        mem = next(r for r in rows if r["kind"] == "memory")
        acc = next((r for r in rows if r["kind"] == "accelerate"), None)

        def lru_alone(r: dict, rows: list[dict] = rows) -> dict | None:
            return next((b for b in rows if b.get("capacity") == r.get("capacity") and b["name"].endswith("% LRU")), None)

        table = []
        for r in rows:
            dense = mem["dense_bytes"]
            budget = r.get("budget_bytes", 0)
            table.append({
                "config": r["name"],
                "decode steps": r["steps"],
                "tokens/s": r["tokens_per_s"],
                "x accelerate": r["tokens_per_s"] / acc["tokens_per_s"] if acc else "",
                "x in memory": r["tokens_per_s"] / mem["tokens_per_s"],
                "peak RSS MiB": r["peak_rss"] * mib,
                "runtime RSS MiB": r["rss_runtime"] * mib,
                "budget+dense MiB": (budget + dense) * mib if r["kind"] == "offload" else "",
                "(peak-runtime)/(budget+dense)": (r["peak_rss"] - r["rss_runtime"]) / (budget + dense)
                if r["kind"] == "offload" else "",
                "disk MiB/token": r["disk_read_mib_per_token"],
                "store MiB/token": r.get("store_mib_per_token", ""),
                "hit rate": r.get("hit_rate", ""),
                "hit rate - LRU alone (points)": (r["hit_rate"] - lru_alone(r)["hit_rate"]) * 100
                if "hit_rate" in r and lru_alone(r) else "",
                "stall s/token": r.get("stall_s_per_token", ""),
                "max |dlogit|": r.get("max_abs_logit_diff", 0.0),
                "argmax agree": r.get("argmax_agree", 1.0),
            })
        title = {"real": "SmolLM2 upcycled to 8 experts (real weights, 318 MB of experts)",
                 "random": "random-weight Mixtral (2.0 GB of experts)"}[model]
        body += [f"### {title}", "", markdown_table(table)]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        cmd = "flock /tmp/infertrix-bench.lock python -m benchmarks.moe" + (" --quick" if args.quick else "")
        if args.models != "all":
            cmd += f" --models {args.models}"
        write_section("moe", "MoE expert offloading", text, command=cmd)


if __name__ == "__main__":
    main()
