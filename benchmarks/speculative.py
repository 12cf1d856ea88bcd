"""Speculative decoding on SmolLM2-135M-Instruct: decode speed against plain ``generate``.

    flock /tmp/infertrix-bench.lock python -m benchmarks.speculative [--quick] [--no-write]

Three prompt kinds, each with four prompts (batch 4 uses all four, left-padded; batch 1 the
first): ``rewrite`` (rewrite a passage of *Pride and Prejudice*, shipped with infertrix),
``story`` (continue a story opening), ``question`` (answer a question). Greedy and sampling at
temperature 0.7. For each drafter and for plain ``generate`` the runs are interleaved (plain,
drafter, plain, drafter...) so that load drift hits both alike; figures are medians of the
repeats. Decode tokens/s = (generated tokens - first tokens) / (generate time - prefill time),
where generated tokens count each row up to its eos and the prefill time is the median time of
``generate(max_new_tokens=1)``. Greedy rows also record whether the output is token-identical to
plain ``generate`` (it must be). Mean accepted length = tokens emitted per row per verification
forward (1.0 = no gain).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

import infertrix as ix
from benchmarks.report import markdown_table, write_section
from infertrix import eval as ixe

REWRITE_STARTS = [
    "It is a truth universally acknowledged",
    "Mr. Bennet was among the earliest of those who waited on Mr. Bingley",
    "Within a short walk of Longbourn lived a family",
    "Elizabeth, feeling really anxious, was determined to go to her",
]
STORIES = [
    "The lighthouse keeper had not seen a ship in eleven days when the storm finally broke.",
    "On the morning of her seventieth birthday, Margaret found a key she did not recognise.",
    "The train stopped in the middle of the forest, and the conductor walked off without a word.",
    "Every night at nine, the dog next door began to bark at exactly the same tree.",
]
QUESTIONS = [
    "What causes the seasons on Earth? Explain clearly.",
    "How does a refrigerator keep food cold?",
    "What are the main differences between a virus and a bacterium?",
    "Why do leaves change colour in autumn?",
]


def passage(start: str, chars: int = 700) -> str:
    text = ixe.text.body_text()
    i = text.find(start)
    if i < 0:
        raise ValueError(f"passage start {start!r} not found in the shipped text")
    chunk = text[i : i + chars]
    return chunk[: chunk.rfind(".") + 1]


def prompts(kind: str) -> list[str]:
    if kind == "rewrite":
        return [f"Rewrite the following passage in the present tense:\n\n{passage(s)}" for s in REWRITE_STARTS]
    if kind == "story":
        return [f"Continue this story:\n\n{s}" for s in STORIES]
    if kind == "question":
        return QUESTIONS
    raise ValueError(kind)


def encode(tok, kind: str, batch: int):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts(kind)[:batch]
    ]
    return tok(texts, return_tensors="pt", padding=True)


def real_tokens(out: torch.Tensor, prompt_len: int, eos: set[int]) -> int:
    n = 0
    for row in out[:, prompt_len:].tolist():
        for t in row:
            n += 1
            if t in eos:
                break
    return n


def truncated_draft(model, layers: int):
    """A same-tokenizer draft for SmolLM2 (no smaller sibling ships offline): its first layers."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="rewrite and question prompts, PromptLookup variants only, 1 repeat after the warm-up")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="*", default=None)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--modes", nargs="*", default=["greedy", "sample"])
    ap.add_argument("--draft-layers", type=int, default=6, help="layers of the truncated SmolLM2 draft model")
    ap.add_argument("--no-draft-model", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = args.kinds or (["rewrite", "question"] if args.quick else ["rewrite", "story", "question"])
    repeats = 1 if args.quick else args.repeats

    model, tok = ix.models.load("smollm2")
    tok.padding_side = "left"
    eos = {int(t) for t in torch.as_tensor(model.generation_config.eos_token_id).flatten().tolist()}
    drafters = {
        "prompt_lookup(num_tokens=10)": lambda: ix.speculative.PromptLookup(num_tokens=10),
        "prompt_lookup(num_tokens=4,min_ngram=2)": lambda: ix.speculative.PromptLookup(num_tokens=4, min_ngram=2),
        "prompt_lookup(num_tokens=6,adaptive)": lambda: ix.speculative.PromptLookup(num_tokens=6, adaptive=True),
    }
    if not args.quick and not args.no_draft_model:
        draft = truncated_draft(model, args.draft_layers)
        drafters[f"draft_model({args.draft_layers}/{model.config.num_hidden_layers} layers)"] = (
            lambda: ix.speculative.DraftModel(draft=draft, num_tokens=4)
        )

    rows = []
    for kind in kinds:
        for batch in args.batches:
            enc = encode(tok, kind, batch)
            plen = enc.input_ids.shape[1]
            prefill = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                model.generate(**enc, max_new_tokens=1, do_sample=False)
                prefill.append(time.perf_counter() - t0)
            t_prefill = statistics.median(prefill[1:])
            for mode in args.modes:
                sample = mode == "sample"
                kw = dict(max_new_tokens=args.new_tokens, do_sample=sample)
                if sample:
                    kw.update(temperature=0.7, top_k=0, top_p=1.0)
                variants = {"plain": None, **drafters}
                res: dict[str, dict] = {v: {"t": [], "tok": [], "mal": [], "out": None} for v in variants}
                for r in range(repeats + 1):  # the first round warms up
                    for name, make in variants.items():
                        if make is not None:
                            ix.optimize(model, make())
                        torch.manual_seed(1000 + r)
                        t0 = time.perf_counter()
                        out = model.generate(**enc, **kw)
                        dt = time.perf_counter() - t0
                        if make is not None:
                            res[name]["mal"].append(model.speculative_stats.last.mean_accepted_length)
                            ix.restore(model)
                        if r == 0:
                            res[name]["out"] = out
                            continue
                        res[name]["t"].append(dt)
                        res[name]["tok"].append(real_tokens(out, plen, eos))
                base = None
                for name in variants:
                    d = res[name]
                    tps = statistics.median(
                        (n - batch) / max(t - t_prefill, 1e-9) for n, t in zip(d["tok"], d["t"], strict=True)
                    )
                    if name == "plain":
                        base = tps
                    row = {
                        "prompts": kind,
                        "batch": batch,
                        "mode": "greedy" if not sample else "T=0.7",
                        "method": name,
                        "decode tok/s": round(tps, 2),
                        "speed-up": round(tps / base, 3),
                        "mean accepted length": round(statistics.median(d["mal"]), 2) if d["mal"] else "",
                        "tokens": statistics.median(d["tok"]),
                        "identical to plain": ("yes" if torch.equal(d["out"], res["plain"]["out"]) else "NO")
                        if not sample and name != "plain"
                        else "",
                    }
                    rows.append(row)
                    print(row, flush=True)

    table = markdown_table(rows)
    print(table)
    if not args.no_write:
        body = (
            f"SmolLM2-135M-Instruct (float32), {args.threads} threads, {args.new_tokens} new tokens, "
            f"median of {repeats} interleaved repeats after a warm-up. Decode tok/s counts each row's "
            "tokens up to its eos, after the prefill (timed separately). Sampling rows differ from plain "
            "by design (same distribution, different draws), so their token counts differ too.\n\n" + table
        )
        write_section("speculative", "speculative: decode speed on SmolLM2", body)


if __name__ == "__main__":
    main(sys.argv[1:])
