"""vLLM side of benchmarks/scale.py; runs inside benchmarks/.venv-vllm (benchmarks/setup_vllm.sh),
never imported by the library or the tests:

    python benchmarks/vllm_runner.py FOLDER TP OUT.json NEW_TOKENS IDS_JSON [FORCED_JSON]

Loads FOLDER (a float or compressed-tensors checkpoint) with ``vllm.LLM(tensor_parallel_size=TP)``
on the CPU, greedily continues each prompt of IDS_JSON (token ids, so both sides see the same
prompt) by NEW_TOKENS tokens, and times decoding at batch 1 and 16 (EOS ignored; the time of a
1-token generation subtracted as prefill). Writes the tokens and tokens/s, or the error vLLM raised.
With FORCED_JSON (one continuation per prompt, e.g. our model's), also feeds prompt + continuation
and writes, per continuation position, vLLM's top token and the log-prob it gives the forced token:
a per-position comparison that one early near-tie cannot turn into a different continuation.

For a pack-quantized (W4A16) folder it also writes which of vLLM CPU's two int4 paths ran: on a CPU
with AMX, bfloat16 activations and ``VLLM_CPU_INT4_W4A8`` unset or 1 (its default),
``CPUWNA16LinearKernel`` (vllm/model_executor/kernels/linear/mixed_precision/cpu.py) runs
``int4_scaled_mm_cpu``, which quantizes activations to int8 per token: W4A8, not W4A16.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def rate(llm, sp_cls, ids: list[int], batch: int, new_tokens: int) -> float:
    prompts = [{"prompt_token_ids": ids}] * batch
    one = sp_cls(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = sp_cls(temperature=0.0, max_tokens=new_tokens + 1, ignore_eos=True)
    llm.generate(prompts, one, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate(prompts, many, use_tqdm=False)
    t2 = time.perf_counter()
    return batch * new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


def int4_path(config: dict, dtype: str) -> str | None:
    """Which int4 kernel vLLM CPU 0.32.0 picks for a pack-quantized checkpoint (the condition of
    ``CPUWNA16LinearKernel.process_weights_after_loading``, x86 only)."""
    import torch

    if config.get("quantization_config", {}).get("format") != "pack-quantized":
        return None
    if dtype == "bfloat16" and torch.cpu._is_amx_tile_supported() and os.environ.get("VLLM_CPU_INT4_W4A8", "1") != "0":
        return "int4_scaled_mm_cpu: int8 per-token activations"
    return "cpu_gemm_wna16: bfloat16 activations"


def forced(llm, sp_cls, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[list[float]]]:
    """Per continuation position: [vLLM's top token, its log-prob, the log-prob of the forced token]."""
    outs = llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, continuations, strict=True)],
                        sp_cls(temperature=0.0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    rows = []
    for p, c, o in zip(prompts, continuations, outs, strict=True):
        row = []
        for j, t in enumerate(c):
            d = o.prompt_logprobs[len(p) + j]  # the distribution of token len(p) + j given the ones before
            top = min(d.items(), key=lambda kv: kv[1].rank)
            row.append([top[0], top[1].logprob, d[t].logprob])
        rows.append(row)
    return rows


def main(folder: str, tp: int, out: str, new_tokens: int, ids_json: str, forced_json: str | None = None) -> None:
    prompts = json.loads(ids_json)
    result: dict = {"folder": folder, "tp": tp}
    try:
        from vllm import LLM, SamplingParams

        # vLLM CPU's int8 kernels take bfloat16 or half activations only ("int8_scaled_mm_with_quant:
        # expect A to be bfloat16 or half"): quantized checkpoints run in bfloat16, float ones in float32
        config = json.loads((Path(folder) / "config.json").read_text())
        result["dtype"] = "bfloat16" if "quantization_config" in config else "float32"
        result["int4_path"] = int4_path(config, result["dtype"])
        t0 = time.perf_counter()
        llm = LLM(model=folder, tensor_parallel_size=tp, dtype=result["dtype"], max_model_len=512,
                  enforce_eager=True, distributed_executor_backend="mp" if tp > 1 else None)
        result["load_s"] = time.perf_counter() - t0
        greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        if forced_json:
            result["forced"] = forced(llm, SamplingParams, prompts, json.loads(forced_json))
        result["tok_s"] = {str(b): rate(llm, SamplingParams, prompts[0], b, 16) for b in (1, 16)}
    except Exception as e:  # noqa: BLE001 - the benchmark records what vLLM refused, and why
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
