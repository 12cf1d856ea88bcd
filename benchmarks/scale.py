"""Past one process: SmolLM2 exported for vLLM CPU and sharded by transformers' tensor parallelism.

    python benchmarks/scale.py --out-dir /tmp/scale-bench            # everything below
    python benchmarks/scale.py --parts ours tp                        # no vLLM

Parts (each writes ``<out-dir>/<part>.json``; a part already there is read, not rerun):
  ours  our single-process model, float and each scheme (``w8a8(smooth_alpha=none)``,
        ``w4a16(symmetric=true)``, ``w4a8(symmetric=true)``): greedy tokens of the shipped agreement
        prompts and decode tokens/s at batch 1 and 16; each scheme exported with ``infertrix.export``.
  tp    the same recipes under ``torchrun --nproc-per-node N`` (benchmarks/tp_runner.py, gloo).
  vllm  ``vllm.LLM`` (benchmarks/vllm_runner.py in benchmarks/.venv-vllm, made by
        benchmarks/setup_vllm.sh) on the float folder and each export, tensor_parallel_size 1 and 2;
        W4A16 once more with ``VLLM_CPU_INT4_W4A8=0``: on AMX CPUs vLLM CPU runs int4 checkpoints
        with int8 activations unless told not to (docs/scale.md, "vLLM CPU"). SmolLM2's 9 heads stop vLLM at
        TP 2; benchmarks/vllm_tp_tiny.py runs TP 2 on a small Llama whose heads divide.
Then one table: greedy agreement with our model of the same recipe, tokens/s, or vLLM's refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
W4A16 = "w4a16(symmetric=true)"
SCHEMES = ["w8a8(smooth_alpha=none)", W4A16, "w4a8(symmetric=true)"]
TP_RECIPES = ["", "w8a8(smooth_alpha=none)", "w4a8(symmetric=true)", "w4a8", "snapkv:0.5", "pld(adaptive=false)"]


def folder_name(recipe: str) -> str:
    return (recipe or "float").split("(")[0] + ("-sym" if "symmetric=true" in recipe else "")


def run_ours(out_dir: Path, new_tokens: int) -> dict:
    """Single-process tokens and rates for float and each scheme; exports each scheme."""
    from tp_runner import decode_rate

    import infertrix as ix
    from infertrix.eval.agreement import AGREEMENT_PROMPTS, greedy_tokens
    from infertrix.models import load

    torch.set_num_threads(1)
    results = {}
    for recipe in ["", *SCHEMES, *[r for r in TP_RECIPES if r and r not in SCHEMES]]:
        model, tok = load("smollm2")
        if recipe:
            ix.optimize(model, recipe)
        row = {"tokens": greedy_tokens(model, tok, AGREEMENT_PROMPTS, max_new_tokens=new_tokens),
               "tok_s": {str(b): decode_rate(model, tok, b, 16) for b in (1, 16)}}
        if recipe in SCHEMES:
            folder = out_dir / folder_name(recipe)
            t0 = time.perf_counter()
            ix.export(model, folder, format="compressed-tensors")
            tok.save_pretrained(folder)
            row["export_s"] = time.perf_counter() - t0
            row["folder"] = str(folder)
        results[recipe] = row
    return results


def run_tp(out_dir: Path, world: int) -> dict:
    from infertrix.models import load

    load("smollm2")  # converts the GGUF once into the cached transformers folder
    from infertrix.models import cache_dir, smollm2_gguf_path

    folder = cache_dir() / "models" / f"smollm2-{smollm2_gguf_path().stat().st_size}"
    out = out_dir / "tp_raw.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(ROOT / "tp_runner.py"), str(folder), str(out), *TP_RECIPES]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.read_text())


def run_vllm(out_dir: Path, ours: dict, new_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from infertrix.eval.agreement import AGREEMENT_PROMPTS
    from infertrix.models import cache_dir, smollm2_gguf_path

    float_folder = cache_dir() / "models" / f"smollm2-{smollm2_gguf_path().stat().st_size}"
    ids = json.dumps([AutoTokenizer.from_pretrained(float_folder)(p).input_ids for p in AGREEMENT_PROMPTS])
    # (recipe, tp, extra environment): W4A16 also as W4A16, not vLLM CPU's default int8-activation path on AMX
    runs = [(r, tp, {}) for r in ["", *SCHEMES] for tp in (1, 2)] + [(W4A16, 1, {"VLLM_CPU_INT4_W4A8": "0"})]
    folders = {recipe: float_folder if not recipe else Path(ours[recipe]["folder"]) for recipe in ["", *SCHEMES]}
    return run_vllm_folders(out_dir, folders, runs, ids, new_tokens)


def run_vllm_folders(out_dir: Path, folders: dict[str, Path], runs: list[tuple[str, int, dict]], ids: str,
                     new_tokens: int, forced: dict[str, str] | None = None) -> dict:
    """benchmarks/vllm_runner.py in benchmarks/.venv-vllm once per (recipe, tp, extra environment); results keyed
    ``recipe|tp`` (``|K=V`` with an extra environment), a refusal or crash recorded as ``error``. ``forced``: per
    recipe, the continuations (JSON) the runner feeds for a per-position comparison."""
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        raise SystemExit("benchmarks/.venv-vllm is missing: bash benchmarks/setup_vllm.sh")
    results = {}
    for recipe, tp, extra in runs:
        tag = " ".join(f"{k}={v}" for k, v in extra.items())
        out = out_dir / f"vllm-{folder_name(recipe)}-tp{tp}{'-' + tag if tag else ''}.json"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", **extra)
        if tp > 1:
            # vLLM CPU's automatic binding gives each worker its own NUMA node and refuses TP 2 on one node
            # ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"): one core per worker,
            # from the cores this process may use (shared round-robin when there are fewer than tp)
            cores = sorted(os.sched_getaffinity(0))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[i % len(cores)]) for i in range(tp)))
        subprocess.run([str(py), str(ROOT / "vllm_runner.py"), str(folders[recipe]), str(tp), str(out),
                        str(new_tokens), ids, *([forced[recipe]] if forced else [])], env=env, timeout=1800)
        results[f"{recipe}|{tp}" + (f"|{tag}" if tag else "")] = (json.loads(out.read_text()) if out.exists()
                                                                  else {"error": "no output"})
    return results


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> str:
    from infertrix.eval.agreement import token_agreement

    return f"{100 * token_agreement(tokens, reference):.0f}%"


def report(ours: dict, tp: dict | None, vllm: dict | None) -> str:
    lines = ["| engine | recipe | TP | greedy agreement with ours | tok/s batch 1 | tok/s batch 16 | note |",
             "|---|---|---|---|---|---|---|"]

    def row(engine, recipe, n, toks, rates, note=""):
        agree = agreement(toks, ours[recipe]["tokens"]) if toks is not None else "-"
        r1, r16 = (f"{rates['1']:.1f}", f"{rates['16']:.1f}") if rates else ("-", "-")
        lines.append(f"| {engine} | `{recipe or 'float'}` | {n} | {agree} | {r1} | {r16} | {note} |")

    for recipe, r in ours.items():
        row("infertrix (transformers)", recipe, 1, r["tokens"], r["tok_s"])
    for recipe, r in (tp or {}).get("results", {}).items():
        row("infertrix (transformers tp_plan)", recipe, tp["world"], r["tokens"], r["tok_s"],
            "ranks agree" if r["ranks_agree"] else "RANKS DIFFER")
    for key, r in (vllm or {}).items():
        recipe, n, *extra = key.split("|")
        note = " ".join(extra) if "error" not in r else r["error"].splitlines()[0][:200].replace("|", "/")
        if r.get("int4_path"):
            note = f"{note} {r['int4_path']}".strip()
        row("vLLM CPU 0.32.0", recipe, n, r.get("tokens"), r.get("tok_s"), note)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/infertrix-scale"))
    ap.add_argument("--parts", nargs="+", default=["ours", "tp", "vllm"], choices=["ours", "tp", "vllm"])
    ap.add_argument("--world", type=int, default=3, help="tp ranks (SmolLM2's 9 heads / 3 KV heads: 3)")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    done = {}
    for part in ["ours", *[p for p in ("tp", "vllm") if p in args.parts]]:
        path = args.out_dir / f"{part}.json"
        if not path.exists():
            data = (run_ours(args.out_dir, args.new_tokens) if part == "ours" else run_tp(args.out_dir, args.world)
                    if part == "tp" else run_vllm(args.out_dir, done["ours"], args.new_tokens))
            path.write_text(json.dumps(data))
        done[part] = json.loads(path.read_text())
    print(report(done["ours"], done.get("tp"), done.get("vllm")))
    print(f"\n{shutil.which('nproc') and os.cpu_count()} CPUs (shared), torch {torch.__version__}")


if __name__ == "__main__":
    main()
