"""MoE expert offloading: tokens/s, peak memory, bytes read and hit rate against accelerate's disk
offload and the model fully in memory.

    flock /tmp/infertrix-bench.lock python -m benchmarks.moe [--quick] [--models real,random]

Models (built once, cached under ~/.cache/infertrix/moe/):
- ``real``: SmolLM2-135M upcycled into a Mixtral MoE, 8 experts of split MLP neurons per layer,
  top-2, router fitted on 2048 tokens of Pride and Prejudice (``infertrix.moe.upcycle``); 30 layers
  x 8 experts x 1.33 MB = 318 MB of experts.
- ``random``: a random-weight Mixtral, 10 layers x 8 experts x 25.2 MB = 2.0 GB of experts.

Each configuration runs in its own subprocess (so peak RSS is its own). All of one model's
subprocesses load and prefill the prompt (prose that follows the router's calibration text), then
decode in lockstep: the driver asks each in turn for one step, feeding the next token of the same
prose (teacher forcing, so routing follows real text). Interleaving the configurations step by
step makes them share whatever load the machine has at that moment (this 2-core machine is shared,
and ``nice`` does not shield a run from other sessions), so ratios between them are fair even when
absolute tokens/s drift. Statistics count the decode steps only. Every run compares its step
logits with the in-memory run's. The offloaded runs build the model with ``load_offloaded``
(experts never all in memory) and start with the store's pages dropped from the page cache; the
store reads experts with O_DIRECT (or drops pages after every read). accelerate's disk offload
(``device_map`` with the experts on ``"disk"``) gets the same treatment: its offload files' pages
are dropped after each experts call, so both read the disk.

``--lowbit`` (upcycled SmolLM2 only) compares float, int8 and int4 experts (EdgeMoE's low-bit
experts, ``ExpertOffload(expert_bits=...)``) at one memory budget, 25% of the float experts' bytes
(the int experts fit 3.95x / 6.9x as many: up to all of them), and at one expert count, 2 of 8 per
layer (each miss moves fewer bytes), LRU without prefetch, plus the perplexity of each
configuration on 2 x 512 tokens of the shipped text after the router's calibration text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(os.environ.get("INFERTRIX_CACHE", Path.home() / ".cache" / "infertrix")) / "moe"
THREADS = 2
CALIB_WINDOWS, WINDOW_TOKENS = 4, 512  # the router's calibration: the first 2048 tokens of the shipped text


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak RSS of this process's own address space (VmHWM). Not ru_maxrss: Linux keeps that across
    fork and exec, so a worker would report the driver's peak (2 GB after building the random Mixtral)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def _prose_ids(n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from infertrix.core.calibration import token_windows

    tok = AutoTokenizer.from_pretrained(build_real())  # its folder holds the tokenizer (built on a fresh machine)
    calib = CALIB_WINDOWS * WINDOW_TOKENS
    ids = token_windows(tok, windows=1, window_tokens=calib + n, start=0.0)
    return ids[:, calib:]  # after the router's calibration text


# -- model preparation (main process) ----------------------------------------------------------
def build_real() -> Path:
    out = ROOT / "smollm2-8x-split"
    if (out / "config.json").exists():
        return out
    from infertrix import models
    from infertrix.core.calibration import token_windows
    from infertrix.moe.upcycle import upcycle

    dense, tok = models.load("smollm2")
    windows = token_windows(tok, windows=CALIB_WINDOWS, window_tokens=WINDOW_TOKENS, start=0.0)
    moe = upcycle(dense, 8, 2, "split", calibration_ids=windows)
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


class _Run:
    """One configuration inside a worker process: load, prefill, then one decode step at a time."""

    def __init__(self, spec: dict):
        torch.set_num_threads(THREADS)
        # the runtime: Python, torch, transformers and the model's code, before any weight is loaded
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401
        from transformers import AutoModelForCausalLM

        from infertrix import optimize
        from infertrix.engine import EngineCache, engine_runtime
        from infertrix.moe import ExpertOffload, load_offloaded, offload_runtime

        self.spec, self.rss_runtime = spec, _rss()
        ckpt, kind = Path(spec["ckpt"]), spec["kind"]
        t0 = time.perf_counter()
        if kind == "memory":  # with optimize's defaults (the decode engine), as the offloaded models have them
            model = optimize(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval())
        elif kind == "accelerate":
            model = _accelerate_model(ckpt, tempfile.mkdtemp(prefix="moe-bench-"))
        else:
            off = ExpertOffload(
                budget=spec["budget"], policy=spec.get("policy", "lru"), prefetch=spec["prefetch"],
                miss_policy=spec.get("miss_policy", "fetch"), store_dir=str(Path(spec["store"])),
                **{k: spec[k] for k in ("expert_bits", "experts_per_layer", "int8_layers") if k in spec},
            )
            model = load_offloaded(ckpt, off)
            offload_runtime(model).cache.store.drop_page_cache()
        self.model, self.load_s = model, time.perf_counter() - t0
        self.rt = offload_runtime(model) if kind == "offload" else None
        self.ids = torch.load(spec["ids"])
        # each step's logits go straight to a file (compared by the driver), not into memory
        self.logits_file = open(spec["logits_out"], "wb")
        # the engine's cache, as generate passes it, where the engine runs the model (else transformers')
        eng = engine_runtime(model)
        self.engine = eng if eng is not None and eng.supported() else None
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(self.ids[:, : spec["prompt"]], use_cache=True, logits_to_keep=1,
                        cache=EngineCache(model.config) if self.engine is not None else None)
            self.prefill_s = time.perf_counter() - t0
        self.past = out.cache
        self.logits_file.write(out.logits[0, -1].numpy().tobytes())
        if self.rt is not None:
            self.rt.cache.reset_stats()
        self.read0, self.steps, self.wall, self.cpu = _read_bytes(), 0, 0.0, 0.0

    def step(self) -> float:
        pos = self.spec["prompt"] + self.steps
        tok = self.ids[:, pos : pos + 1]
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            out = self.model(tok, cache=self.past, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t0
            self.cpu += time.process_time() - c0
        self.wall += dt
        self.steps += 1
        self.past = out.cache
        self.logits_file.write(out.logits[0, -1].numpy().tobytes())
        return dt

    def result(self) -> dict:
        from infertrix.core.model import tensor_bytes

        self.logits_file.close()
        spec, model, rt, steps = self.spec, self.model, self.rt, self.steps
        res = {
            "name": spec["name"], "kind": spec["kind"], "steps": steps, "load_s": self.load_s,
            "prefill_s": self.prefill_s, "tokens_per_s": steps / self.wall, "cpu_s_per_token": self.cpu / steps,
            "disk_read_mib_per_token": (_read_bytes() - self.read0) / 2**20 / steps,
            "rss_runtime": self.rss_runtime, "peak_rss": _peak_rss(),
        }
        if self.engine is not None:  # which path the decode steps took (the engine falls back per forward, and says why)
            report = self.engine.report()
            res["path"] = "engine" if report["module_forwards"] == 0 else f"engine+module ({report['fallbacks']})"
        if spec["kind"] == "memory":
            res["dense_bytes"] = tensor_bytes(model) - sum(
                m.gate_up_proj.nbytes + m.down_proj.nbytes for m in model.modules() if hasattr(m, "gate_up_proj")
            )
        if rt is not None:
            if rt.prefetcher is not None:
                rt.prefetcher.stop()  # in-flight loads finish: the counters are final
            stats = rt.cache.stats()
            res.update(
                hit_rate=stats.hit_rate, prefetch_used=stats.prefetch_used, prefetched=stats.prefetched,
                store_mib_per_token=stats.bytes_read / 2**20 / steps, stall_s_per_token=stats.stall_seconds / steps,
                budget_bytes=rt.cache.budget_bytes, capacity=rt.cache.capacity, dense_bytes=tensor_bytes(model),
                capacity_min=min(rt.cache.capacities.values()),
                in_place=stats.computed_in_place, expert_bits=rt.cache.store.bits,
                expert_bytes=rt.cache.store.expert_bytes,
            )
        if spec.get("ppl_windows"):  # after the statistics: these forwards would count in them
            res["perplexity"] = _perplexity(model, self.ids, spec["ppl_windows"])
        return res


def _perplexity(model, ids: torch.Tensor, windows: int, window_tokens: int = 512) -> float:
    """Perplexity on ``windows`` consecutive windows of ``ids`` (one forward each, no cache)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[:, w * window_tokens : (w + 1) * window_tokens]
            logits = model(x, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return float(np.exp(nll / count))


def worker(spec: dict) -> None:
    """The subprocess side of the lockstep protocol: READY, then one line per request."""
    run = _Run(spec)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(f"STEP {run.step()}", flush=True)
        else:
            break
    print("RESULT " + json.dumps(run.result()), flush=True)


# -- driver -------------------------------------------------------------------------------------
#: offloaded configurations per model: (name, budget, prefetch, other ExpertOffload fields)
OFFLOAD_CONFIGS = {
    "real": [
        ("50% LRU", 0.5, False, {}), ("50% LRU+prefetch", 0.5, True, {}),
        ("25% LRU", 0.25, False, {}), ("25% LRU+prefetch", 0.25, True, {}),
    ],  # LFU and miss_policy="auto" are tested for exactness; left out here to keep a run < 12 min
    "random": [("50% LRU+prefetch", 0.5, True, {}), ("25% LRU", 0.25, False, {}), ("25% LRU+prefetch", 0.25, True, {})],
}
#: --lowbit: (name, ExpertOffload fields); every one LRU without prefetch
LOWBIT_CONFIGS = [
    ("float 25% of float bytes", dict(budget=0.25)),
    ("int8 25% of float bytes", dict(budget=0.25, expert_bits=8)),
    ("int4 25% of float bytes", dict(budget=0.25, expert_bits=4)),
    ("int8 2/8 experts", dict(budget=0.25, experts_per_layer=2, expert_bits=8)),
    ("int4 2/8 experts", dict(budget=0.25, experts_per_layer=2, expert_bits=4)),
    ("int4 + int8 in 27% of layers, 25% of float bytes", dict(budget=0.25, expert_bits=4, int8_layers=-1)),
]
#: int8 layers of the mixed row per model (about the 8 of SmolLM2's 30 that brought int4 within 3%; which
#: layers does not change the speed: the last ones here, where the measured costs were highest)
INT8_LAYERS = {"real": 8, "random": 3}
TITLES = {"real": "SmolLM2 upcycled to 8 experts (real weights, 318 MB of experts)",
          "random": "random-weight Mixtral (2.0 GB of experts)"}


def configs(quick: bool, model: str, steps: int | None = None) -> list[dict]:
    """The configurations of one model: in memory, each offload setting, accelerate."""
    acc_steps = {"real": 3 if quick else 6, "random": 1 if quick else 2}[model]
    if steps is None:
        steps = {"real": 12 if quick else 24, "random": 3 if quick else 6}[model]
    acc_steps = min(acc_steps, steps)
    out = [dict(model=model, name="in memory", kind="memory", steps=steps)]
    for name, budget, prefetch, extra in OFFLOAD_CONFIGS[model]:
        out.append(dict(model=model, name=f"offload {name}", kind="offload", budget=budget, prefetch=prefetch,
                        steps=steps, **extra))
    out.append(dict(model=model, name="accelerate disk offload", kind="accelerate", steps=acc_steps))
    return out


def lowbit_configs(steps: int, model: str = "real") -> list[dict]:
    """In memory and each LOWBIT_CONFIGS setting; perplexity on the real model only (random weights
    have none worth reading)."""
    ppl = {"ppl_windows": 2} if model == "real" else {}
    out = [dict(model=model, name="in memory (float)", kind="memory", steps=steps, **ppl)]
    for name, fields in LOWBIT_CONFIGS:
        if fields.get("int8_layers") == -1:
            fields = {**fields, "int8_layers": INT8_LAYERS[model]}
        out.append(dict(model=model, name=f"offload {name}", kind="offload", prefetch=False, steps=steps,
                        **ppl, **fields))
    return out


def _mixed_store(ck: Path, store: Path, int8_layers: int) -> None:
    """A store of int4 experts with the last ``int8_layers`` MoE layers in int8, written from the
    loaded model (round to nearest: the speed does not depend on how the codes were chosen)."""
    from transformers import AutoModelForCausalLM

    from infertrix.moe import ExpertStore, find_moe_layers

    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    layers = find_moe_layers(model)
    ExpertStore.from_model(model, store, 4, 32, layer_bits={x.index: 8 for x in layers[-int8_layers:]}).close()


def _lowbit_row(r: dict, rows: list[dict]) -> dict:
    mem = next(x for x in rows if x["kind"] == "memory")
    flt = next(x for x in rows if x["kind"] == "offload" and x["expert_bits"] == 32)
    offload = r["kind"] == "offload"
    return {
        "config": r["name"],
        "expert bits": r.get("expert_bits", 32),
        "KiB/expert": r["expert_bytes"] / 1024 if offload else "",
        "resident/layer": (f"{r['capacity']}/8" if r.get("capacity_min", r["capacity"]) == r["capacity"]
                           else f"{r['capacity_min']}-{r['capacity']}/8") if offload else "8/8",
        "cache MiB": r["budget_bytes"] / 2**20 if offload else "",
        "decode path": r.get("path", "module"),
        "tokens/s": r["tokens_per_s"],
        "x float offload": r["tokens_per_s"] / flt["tokens_per_s"],
        "x in memory": r["tokens_per_s"] / mem["tokens_per_s"],
        "hit rate": r.get("hit_rate", ""),
        "store MiB/token": r.get("store_mib_per_token", ""),
        "stall s/token": r.get("stall_s_per_token", ""),
        "peak RSS MiB": r["peak_rss"] / 2**20,
        "perplexity": r.get("perplexity", ""),
        "x float ppl": r["perplexity"] / mem["perplexity"] if "perplexity" in r else "",
        "max |dlogit| vs float": r.get("max_abs_logit_diff", 0.0),
        "argmax agree": r.get("argmax_agree", 1.0),
    }


def _expect(proc: subprocess.Popen, prefix: str, spec: dict, err: Path) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    proc.wait()
    raise SystemExit(f"worker {spec['model']}/{spec['name']} failed:\n{err.read_text()[-5000:]}")


def run_lockstep(specs: list[dict]) -> list[dict]:
    """Start one worker per spec, let all load and prefill, then step them round-robin."""
    procs = []
    for i, spec in enumerate(specs):
        err = ROOT / f"worker-{i}.err"
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.moe", "--worker", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True, bufsize=1)
        procs.append((spec, proc, err))
    for spec, proc, err in procs:
        _expect(proc, "READY", spec, err)
    for r in range(max(s["steps"] for s in specs)):
        for spec, proc, err in procs:
            if r < spec["steps"]:
                proc.stdin.write("step\n")
                proc.stdin.flush()
                _expect(proc, "STEP ", spec, err)
    results = []
    for spec, proc, err in procs:
        proc.stdin.write("end\n")
        proc.stdin.flush()
        results.append(json.loads(_expect(proc, "RESULT ", spec, err)))
        proc.wait()
    return results


def _row(r: dict, rows: list[dict]) -> dict:
    mem = next(x for x in rows if x["kind"] == "memory")
    acc = next((x for x in rows if x["kind"] == "accelerate"), None)
    lru = next((b for b in rows if b.get("capacity") == r.get("capacity") and b["name"].endswith("% LRU")), None)
    offload = r["kind"] == "offload"
    budget_dense = r.get("budget_bytes", 0) + mem["dense_bytes"]
    mib = 1 / 2**20
    return {
        "config": r["name"],
        "decode steps": r["steps"],
        "tokens/s": r["tokens_per_s"],
        "x accelerate": r["tokens_per_s"] / acc["tokens_per_s"] if acc else "",
        "x in memory": r["tokens_per_s"] / mem["tokens_per_s"],
        "CPU s/token": r["cpu_s_per_token"],
        "peak RSS MiB": r["peak_rss"] * mib,
        "runtime RSS MiB": r["rss_runtime"] * mib,
        "budget+dense MiB": budget_dense * mib if offload else "",
        "(peak-runtime)/(budget+dense)": (r["peak_rss"] - r["rss_runtime"]) / budget_dense if offload else "",
        "disk MiB/token": r["disk_read_mib_per_token"],
        "store MiB/token": r.get("store_mib_per_token", ""),
        "hit rate": r.get("hit_rate", ""),
        "hit rate - LRU alone (points)": (r["hit_rate"] - lru["hit_rate"]) * 100 if offload and lru else "",
        "stall s/token": r.get("stall_s_per_token", ""),
        "max |dlogit|": r.get("max_abs_logit_diff", 0.0),
        "argmax agree": r.get("argmax_agree", 1.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer decode steps")
    ap.add_argument("--models", default="all", choices=("all", "real", "random"))
    ap.add_argument("--steps", type=int, help="decode steps per configuration (a smoke test); implies --no-write")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--lowbit", action="store_true",
                    help="float vs int8 vs int4 experts (upcycled SmolLM2; with --models random the 2 GB Mixtral)")
    ap.add_argument("--offload-only", action="store_true",
                    help="with --lowbit-quality: only the library rows (ExpertOffload with GPTQ and int8_layers)")
    ap.add_argument("--lowbit-quality", action="store_true",
                    help="perplexity of dense SmolLM2 with each MLP computed as one int8/int4 expert")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.lowbit:
        main_lowbit(args)
        return
    if args.lowbit_quality:
        (_offload_only if args.offload_only else lowbit_quality)(args)
        return

    from benchmarks.report import markdown_table, write_section
    from infertrix.moe import ExpertStore

    torch.set_num_threads(THREADS)
    ROOT.mkdir(parents=True, exist_ok=True)
    models = ["real", "random"] if args.models == "all" else [args.models]
    ids_file = ROOT / "prose_ids.pt"
    torch.save(_prose_ids(32 + 128 + 1), ids_file)
    for model in models:
        ck = build_real() if model == "real" else build_random()
        store = ROOT / f"{ck.name}-store"
        if not (store / "manifest.json").exists():
            ExpertStore.from_checkpoint(ck, store).close()
        specs = configs(args.quick, model, args.steps)
        for i, spec in enumerate(specs):
            spec.update(ckpt=str(ck), store=str(store), ids=str(ids_file), prompt=32,
                        logits_out=str(ROOT / f"logits-{model}-{i}.f32"))
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        results = run_lockstep(specs)
        ref_spec = specs[0]
        ref = np.fromfile(ref_spec["logits_out"], dtype=np.float32).reshape(ref_spec["steps"] + 1, -1)
        for spec, r in zip(specs, results, strict=True):
            got = np.fromfile(spec["logits_out"], dtype=np.float32).reshape(r["steps"] + 1, -1)
            r["max_abs_logit_diff"] = float(np.abs(got - ref[: got.shape[0]]).max())
            r["argmax_agree"] = float((got.argmax(-1) == ref[: got.shape[0]].argmax(-1)).mean())
            print(json.dumps(r), flush=True)
        saved = {"results": results, "wall_s": time.perf_counter() - t0, "quick": args.quick,
                 "load_avg": [load0, os.getloadavg()[0]],
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        if args.steps is None:
            (ROOT / f"results-{model}.json").write_text(json.dumps(saved, indent=1))

    # the section shows the latest saved run of each model (each model may be run on its own)
    body = [__doc__.split("\n\n", 2)[2].strip(), ""]
    for model in ("real", "random"):
        f = ROOT / f"results-{model}.json"
        if not f.exists():
            continue
        saved = json.loads(f.read_text())
        rows = saved["results"]
        body += [f"### {TITLES[model]}", "",
                 f"Run {saved['date']}{' (--quick)' if saved['quick'] else ''}, {saved['wall_s']:.0f} s, "
                 f"machine load average {saved['load_avg'][0]:.1f} at start, {saved['load_avg'][1]:.1f} at end.", "",
                 markdown_table([_row(r, rows) for r in rows]), ""]
    text = "\n".join(body)
    print(text)
    if not args.no_write and args.steps is None:
        cmd = "flock /tmp/infertrix-bench.lock python -m benchmarks.moe --models real; ... --models random"
        write_section("moe", "MoE expert offloading", text, command=cmd)


def main_lowbit(args: argparse.Namespace) -> None:
    """``--lowbit``: float vs int8 vs int4 experts, lockstep; its own section of BENCHMARKS.md."""
    from infertrix.moe import ExpertStore

    torch.set_num_threads(THREADS)
    ROOT.mkdir(parents=True, exist_ok=True)
    model = "random" if args.models == "random" else "real"
    ck = build_real()  # its folder also holds the tokenizer the prose ids come from
    if model == "random":
        ck = build_random()
    ids_file = ROOT / "prose_ids_1024.pt"
    torch.save(_prose_ids(1024), ids_file)  # decode steps and the perplexity windows read these tokens
    specs = lowbit_configs(args.steps or (12 if args.quick or model == "random" else 24), model)
    for i, spec in enumerate(specs):
        bits, wide = spec.get("expert_bits"), spec.get("int8_layers", 0)
        store = ROOT / f"{ck.name}-store{f'-int{bits}' if bits else ''}{f'-int8x{wide}' if wide else ''}"
        if spec["kind"] == "offload" and not (store / "manifest.json").exists():
            if wide:
                _mixed_store(ck, store, wide)
            else:
                ExpertStore.from_checkpoint(ck, store, bits).close()
        spec.update(ckpt=str(ck), store=str(store), ids=str(ids_file), prompt=32,
                    logits_out=str(ROOT / f"logits-lowbit-{i}.f32"))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = run_lockstep(specs)
    ref = np.fromfile(specs[0]["logits_out"], dtype=np.float32).reshape(specs[0]["steps"] + 1, -1)
    for spec, r in zip(specs, results, strict=True):
        got = np.fromfile(spec["logits_out"], dtype=np.float32).reshape(r["steps"] + 1, -1)
        r["max_abs_logit_diff"] = float(np.abs(got - ref).max())
        r["argmax_agree"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        print(json.dumps(r), flush=True)
    wall = time.perf_counter() - t0
    _write_lowbit(args, model, results, load0, wall)


#: --lowbit: per model, what the run measured and its section of BENCHMARKS.md
_LOWBIT_TEXT = {
    "real": ("moe-lowbit", "MoE low-bit experts (float vs int8 vs int4)",
             "the upcycled SmolLM2 (30 layers x 8 experts, fp32: 1.33 MB each)",
             "Perplexity: 2 x 512 tokens of the shipped text after the router's calibration text (this upcycled "
             "model keeps 2 of 8 neuron groups: its perplexity is high whatever the bits, and its chaotic logits "
             "amplify any change: read the perplexity ratio as a rough sign, not as the quality cost of low-bit "
             "experts on a trained MoE)."),
    "random": ("moe-lowbit-random", "MoE low-bit experts on the 2 GB random Mixtral",
               "the random-weight Mixtral (10 layers x 8 experts, fp32: 25.2 MB each, 2.0 GB of experts)",
               "Random weights: no perplexity (see `moe-lowbit` and `moe-lowbit-quality` for the quality cost)."),
}


def _write_lowbit(args: argparse.Namespace, model: str, results: list[dict], load0: float, wall: float) -> None:
    """The ``--lowbit`` table of one model and its section of BENCHMARKS.md."""
    from benchmarks.report import markdown_table, write_section

    section, title, what, quality = _LOWBIT_TEXT[model]
    kernels = (" Every configuration, the in-memory one included, runs with `optimize`'s defaults: the decode "
               "engine runs each layer's attention half on its ops and calls the MoE block as the model's module "
               "(`engine/moe.py`); `decode path` says which path the decode steps took.")
    body = "\n".join([
        f"Low-bit experts (EdgeMoE, arXiv:2308.14352): `ExpertOffload(expert_bits=8|4)` on {what}, LRU, no "
        "prefetch, the expert cache counted in bytes (25% of the float experts' bytes per layer, or 2 experts "
        "per layer). All configurations decode in lockstep in one run (ratios are what to read; 2 cores, the "
        f"lockstep workers included in the load average: {load0:.1f} at start, {os.getloadavg()[0]:.1f} at "
        f"end), {results[0]['steps']} teacher-forced decode steps, {wall:.0f} s. {quality} max |dlogit| and "
        "argmax agree compare each decode step's logits with the in-memory float model's." + kernels,
        "",
        markdown_table([_lowbit_row(r, results) for r in results]),
    ])
    print(body)
    if not args.no_write and args.steps is None:
        models = " --models random" if model == "random" else ""
        write_section(section, title, body,
                      command=f"flock /tmp/infertrix-bench.lock python -m benchmarks.moe --lowbit{models}")


class _MLPAsExpert(torch.nn.Module):
    """A dense MLP computed as one low-bit expert: what sparse ("copy") upcycling of SmolLM2 computes
    with ``expert_bits`` (its experts are copies of the MLP), without 8 copies on disk."""

    def __init__(self, mlp: torch.nn.Module, bits: int, group_size: int = 32, hessians=None):
        super().__init__()
        from infertrix.moe.lowbit import LowBitFormat

        gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        dn = mlp.down_proj.weight.detach()
        self.fmt, self.act_fn = LowBitFormat(bits, group_size, tuple(gu.shape), tuple(dn.shape)), mlp.act_fn
        self.parts = self.fmt.views(self.fmt.encode(gu, dn, hessians))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmt.forward(self.parts, x.reshape(-1, x.shape[-1]), self.act_fn).view(x.shape)


def _mlp_hessians(model, windows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each dense MLP's input Hessians (gate/up input, down input) on ``windows``: what
    ``moe.calibrate`` gives an expert that every token is routed to."""
    from infertrix.core.calibration import run_windows

    sums: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.t() @ x
        return f

    handles = [h for i, layer in enumerate(model.model.layers)
               for h in (layer.mlp.gate_proj.register_forward_pre_hook(hook((i, "gu"))),
                         layer.mlp.down_proj.register_forward_pre_hook(hook((i, "down"))))]
    run_windows(model, windows, progress=False)
    for h in handles:
        h.remove()
    return [(sums[(i, "gu")].float(), sums[(i, "down")].float()) for i in range(len(model.model.layers))]



def lowbit_quality(args: argparse.Namespace) -> None:
    """``--lowbit-quality``: the perplexity cost of int8/int4 experts on real trained weights."""
    from benchmarks.report import markdown_table, write_section
    from infertrix import models
    from infertrix.core.calibration import token_windows

    torch.set_num_threads(THREADS)
    build_real()  # its tokenizer and text windows
    ids = _prose_ids(1024)
    dense, tok = models.load("smollm2")
    hessians = _mlp_hessians(dense.eval(), token_windows(tok, windows=8, window_tokens=256))  # ExpertOffload's
    rows = []
    for bits, group, gptq in ((None, 0, False), (8, 32, False), (4, 64, False), (4, 32, False), (4, 16, False),
                              (8, 32, True), (4, 32, True), (4, 16, True)):
        model, _ = models.load("smollm2")
        mlp = model.model.layers[0].mlp
        float_bytes = 4 * sum(p.numel() for p in mlp.parameters())
        if bits is not None:
            for i, layer in enumerate(model.model.layers):
                layer.mlp = _MLPAsExpert(layer.mlp, bits, group, hessians[i] if gptq else None)
        ppl = _perplexity(model.eval(), ids, 2)
        name = "float32" if bits is None else f"int{bits} (moe.lowbit)" + (f", group {group}" if bits == 4 else "")
        rows.append({"MLP weights": name + (", GPTQ" if gptq else ""), "perplexity": ppl,
                     "x float": ppl / rows[0]["perplexity"] if rows else 1.0,
                     "bytes vs float": model.model.layers[0].mlp.fmt.nbytes / float_bytes if bits else 1.0})
        print(rows[-1], flush=True)
    rows += _mixed_bits_rows(ids, rows[0]["perplexity"], rows[1]["bytes vs float"], rows[3]["bytes vs float"])
    rows += _mixed_bits_rows(ids, rows[0]["perplexity"], rows[1]["bytes vs float"], rows[3]["bytes vs float"],
                             hessians)
    rows += _offload_rows(ids, rows[0]["perplexity"])
    body = ("Dense SmolLM2-135M with every MLP computed as one low-bit expert (`LowBitFormat`, int8 "
            "activations; attention and head float): the model sparse (`copy`) upcycling gives, i.e. the "
            "quality cost of `expert_bits` (and, for int4, of `expert_group_size`) on trained weights. "
            "Perplexity on 2 x 512 tokens of the shipped text after the first 2048 (the text the --lowbit "
            "run decodes); bytes: one expert's blob against its float32 weights. Mixed rows (EdgeMoE's "
            "per-expert bit widths, with one expert per layer here): int8 for the k layers whose MLP alone at "
            "int4 (group 32, the rest float) raised the perplexity of the first window most, int4 for the "
            "others. GPTQ rows: each MLP's codes by GPTQ from its input Hessians on 8 x 256 tokens from the end "
            "of the book (what `ExpertOffload(expert_gptq=True)` computes for an expert every token reaches; "
            "`moe.calibrate`). Copy-upcycled rows: the library path end to end (`ExpertOffload` on SmolLM2 "
            "copy-upcycled to 4 experts, top-2: each copy calibrated on the tokens routed to it; `int8_layers`: "
            "the layers whose experts at int4 raised the calibration loss most, measured one layer at a time, in "
            "int8).\n\n"
            + markdown_table(rows))
    print(body)
    if not args.no_write:
        write_section("moe-lowbit-quality", "MoE low-bit experts: quality on trained weights", body,
                      command="python -m benchmarks.moe --lowbit-quality")


def _mixed_bits_rows(ids: torch.Tensor, float_ppl: float, int8_bytes: float, int4_bytes: float,
                     hessians=None) -> list[dict]:
    """int8 for the k most sensitive MLPs (each measured alone at int4), int4 for the rest; with
    ``hessians`` every MLP by GPTQ."""
    from infertrix import models

    model, _ = models.load("smollm2")
    model.eval()
    layers = model.model.layers
    mlps = [layer.mlp for layer in layers]
    low = {bits: [_MLPAsExpert(m, bits, 32, None if hessians is None else hessians[i]) for i, m in enumerate(mlps)]
           for bits in (4, 8)}
    base = _perplexity(model, ids, 1)
    rise = []
    for i, layer in enumerate(layers):
        layer.mlp = low[4][i]
        rise.append(_perplexity(model, ids, 1) / base - 1)
        layer.mlp = mlps[i]
    order = sorted(range(len(layers)), key=lambda i: -rise[i])
    print("perplexity rise with one MLP at int4:", {i: f"{rise[i]:+.2%}" for i in order[:6]}, flush=True)
    rows = []
    for k in (2, 4, 8):
        for i, layer in enumerate(layers):
            layer.mlp = low[8][i] if i in order[:k] else low[4][i]
        ppl = _perplexity(model, ids, 2)
        how = "" if hessians is None else ", GPTQ"
        rows.append({"MLP weights": f"mixed{how}: int8 for {k} layers ({', '.join(map(str, sorted(order[:k])))}), "
                                    "int4 g32",
                     "perplexity": ppl, "x float": ppl / float_ppl,
                     "bytes vs float": (k * int8_bytes + (len(layers) - k) * int4_bytes) / len(layers)})
        print(rows[-1], flush=True)
    return rows


def _offload_only(args: argparse.Namespace) -> None:
    """``--lowbit-quality --offload-only``: the library rows alone, in a section of their own."""
    from benchmarks.report import markdown_table, write_section
    from infertrix import models

    torch.set_num_threads(THREADS)
    build_real()
    ids = _prose_ids(1024)
    dense, _ = models.load("smollm2")
    float_ppl = _perplexity(dense.eval(), ids, 2)
    del dense
    rows = [{"MLP weights": "float32 (dense SmolLM2 = its copy-upcycled MoE)", "perplexity": float_ppl, "x float": 1.0,
             "bytes vs float": 1.0}]
    rows += _offload_rows(ids, float_ppl, ((True, 0), (True, 4), (True, 8)))
    body = ("The library path alone (the last rows of `moe-lowbit-quality`): SmolLM2 copy-upcycled to 4 experts "
            "(top-2), `ExpertOffload(budget=0.25, expert_bits=4, expert_gptq=True, int8_layers=k)`, perplexity on "
            "the same 2 x 512 tokens. `int8_layers` ranks the layers by the KL divergence of the next-token "
            "distributions with one layer's experts at int4, on the 8 x 256 calibration tokens.\n\n"
            + markdown_table(rows))
    print(body)
    if not args.no_write:
        write_section("moe-lowbit-quality-offload", "MoE low-bit experts: the library path, int8 layers by KL", body,
                      command="python -m benchmarks.moe --lowbit-quality --offload-only")


def _offload_rows(ids: torch.Tensor, float_ppl: float,
                  configs=((False, 0), (True, 0), (True, 4), (True, 8))) -> list[dict]:
    """The library path end to end: SmolLM2 copy-upcycled to 4 experts (top-2; each a copy of the
    MLP, so the model computes the dense one while each copy sees only its routed tokens), then
    ``ExpertOffload(budget=0.25, expert_bits=4[, expert_gptq=True])``; calibrated on the end of
    the book through the model's own router."""
    import infertrix as ix
    from infertrix import models
    from infertrix.moe import ExpertOffload, offload_runtime
    from infertrix.moe.upcycle import upcycle

    rows = []
    for gptq, int8_layers in configs:
        dense, tok = models.load("smollm2")
        moe = upcycle(dense, 4, 2, "copy")
        del dense
        t0 = time.perf_counter()
        ix.optimize(moe, ExpertOffload(budget=0.25, expert_bits=4, expert_gptq=gptq, int8_layers=int8_layers,
                                       tokenizer=tok, progress=False))
        took = time.perf_counter() - t0
        ppl = _perplexity(moe, ids, 2)
        report = next(t["report"] for t in ix.describe(moe).to_dict()["transforms"] if "expert_rounding" in t["report"])
        cfg = moe.config
        float_bytes = 4 * 3 * cfg.hidden_size * cfg.intermediate_size
        store = offload_runtime(moe).cache.store
        wide = f", int8 in layers {report['int8_layers']}" if int8_layers else ""
        rows.append({"MLP weights": f"copy-upcycled 4 experts, ExpertOffload int4 g32{wide} "
                                    f"({report['expert_rounding']}; optimize {took:.0f} s)",
                     "perplexity": ppl, "x float": ppl / float_ppl,
                     "bytes vs float": store.total_bytes / (float_bytes * store.num_experts * len(store.layers))})
        print(rows[-1], flush=True)
        ix.restore(moe)
    return rows


if __name__ == "__main__":
    main()
