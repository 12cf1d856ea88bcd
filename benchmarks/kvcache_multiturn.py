"""Two questions on one compressed cache: a chat's turns on RULER's niah_multiquery samples.

    flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache_multiturn --samples 10
    ... --section kvcache-multiturn      # also writes that section of BENCHMARKS.md

Each niah_multiquery sample (RULER, Hsieh et al. 2024, https://arxiv.org/abs/2404.06654; made by
setup_ruler.sh) hides four keys' numbers in an essay haystack and asks for all four. Here its context
(the input up to RULER's question) is prefilled first, then two turns ask for one key each with RULER's
single-key question, the niah template's question and answer prefix made singular as RULER's niah.py
does for one needle ("What is the special magic number for {key} mentioned in the provided text? The
special magic number for {key} mentioned in the provided text is"):

- turn 1: ``generate(context + question 1, cache=cache)``, greedy;
- turn 2: ``generate(turn 1's sequences + question 2, cache=cache)`` on the same cache: the answer of
  turn 1 stays in the conversation, the key asked is the second one.

Each turn is scored by RULER's ``string_match_all`` against its key's number (RULER's post-processing
first). Question-agnostic: the context is compressed before the first question arrives (the cell's
cache is built from one recorded prefill of the context, ``replay``, what a prefill through generate
would hold). Rows:

- ``<method>:0.5``: the library's behaviour, each turn a prefill chunk (at least ``prefill_min_tokens``
  new tokens) compresses the grown cache back to half of every token seen, scored with that turn's
  queries;
- ``<method>:0.5, turns kept``: ``prefill_min_tokens=256``, so only the context is compressed and the
  turns' tokens are kept whole (the cache grows by them);
- ``<method>:0.5, re-prefilled``: no reuse, each turn prefills the whole conversation into a fresh
  cache (context and question compressed together, twice the prefill).

``KV KiB`` is the cache after turn 2; ``s/sample`` the context's prefill plus the cell's two turns.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import markdown_table, write_section
from benchmarks.ruler_samples import (
    ROOT,
    load_samples,
    module_from,
    postprocess,
    ruler_package,
    split_question,
    stamped_log,
)

TASK = "niah_multiquery"
DEFAULT_METHODS = ["SnapKV", "KeyDiff", "StreamingLLM"]
TURNS_KEPT_MIN_TOKENS = 256  # prefill_min_tokens of the "turns kept" rows: more than a turn, less than a context


def single_key_question(pkg: Path) -> str:
    """RULER's niah question and answer prefix for one key (``{key}`` to fill), made singular as
    niah.py makes its template for one needle and one value."""
    niah = module_from(pkg / "data" / "synthetic" / "constants.py", "ruler_data_constants").TASKS["niah"]
    text = niah["template"].split("{context}")[1] + niah["answer_prefix"]
    for plural, singular in (("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, singular)
    return text.replace("{type_needle_v}", "number").replace("{query}", "{key}")


def keys_of(sample: dict) -> list[str]:
    """The sample's keys in the order of its ``outputs`` (niah.py joins them "a, b, c, and d")."""
    _, question = split_question(sample["input"], "niah")
    query = re.search(r" for (.*?) mentioned in the provided text\?", question).group(1)
    keys = [k.removeprefix("and ") for k in query.split(", ")]
    if len(keys) != len(sample["outputs"]):
        raise ValueError(f"{len(keys)} keys for {len(sample['outputs'])} answers in {query!r}")
    return keys


def grid(methods: list[str], ratio: float, reprefill: list[str]):
    """(label, policy or None, mode) of every row; mode is 'reuse' or 'reprefill'."""
    import infertrix as ix

    by_name = {c.__name__: c for c in ix.available("kvcache").values()}
    rows = [("full cache", None, "reuse")]
    for name in methods:
        cls = by_name[name]
        rows.append((f"{cls.name}:{ratio:g}", cls(compression=ratio), "reuse"))
        kept = cls(compression=ratio, prefill_min_tokens=TURNS_KEPT_MIN_TOKENS)
        rows.append((f"{cls.name}:{ratio:g}, turns kept", kept, "reuse"))
    for name in reprefill:
        cls = by_name[name]
        rows.append((f"{cls.name}:{ratio:g}, re-prefilled", cls(compression=ratio), "reprefill"))
    return rows


def kv_bytes(cache) -> int:
    from infertrix.eval import kv_cache_bytes

    return cache.kv_bytes() + cache.state_bytes() if hasattr(cache, "kv_bytes") else kv_cache_bytes(cache)


@torch.no_grad()
def two_turns(model, tok, context, questions, policy, mode: str, rec, steps: int):
    """(answer 1, answer 2, KV bytes after turn 2) of one cell on one sample."""
    import infertrix as ix
    from infertrix.kvcache.replay import replay

    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    if policy is not None:
        ix.optimize(model, policy)
    try:
        if mode == "reuse":  # the context's cache, compressed before any question
            kw["cache"] = copy.deepcopy(rec.cache) if policy is None else replay(model, rec, policy)
        ids = torch.cat([context, questions[0]], 1)
        out1 = model.generate(ids, **kw)
        ids2 = torch.cat([out1.sequences, questions[1]], 1)
        out2 = model.generate(ids2, **kw)
    finally:
        if policy is not None:
            ix.restore(model)
    seq1, seq2 = out1.sequences, out2.sequences
    answers = [tok.decode(s[0, len(i[0]):], skip_special_tokens=True) for s, i in ((seq1, ids), (seq2, ids2))]
    return [postprocess(a) for a in answers] + [kv_bytes(out2.cache)]


def run(model, tok, samples, rows, question: str, steps: int, metric, log) -> dict:
    from infertrix.kvcache.replay import record_prefill

    res = {label: {"answers": ([], []), "refs": ([], []), "kv": [], "s": 0.0} for label, *_ in rows}
    for n, sample in enumerate(samples):
        context, _ = split_question(sample["input"], "niah")
        keys = keys_of(sample)
        ctx = torch.tensor([tok(context).input_ids])
        qs = [torch.tensor([tok(question.format(key=k), add_special_tokens=False).input_ids]) for k in keys[:2]]
        t0 = time.perf_counter()
        rec = record_prefill(model, ctx)
        prefill = time.perf_counter() - t0
        for label, policy, mode in rows:
            t0 = time.perf_counter()
            a1, a2, kv = two_turns(model, tok, ctx, qs, policy, mode, rec, steps)
            d = res[label]
            d["s"] += time.perf_counter() - t0 + (prefill if mode == "reuse" else 0.0)
            for turn, answer in enumerate((a1, a2)):
                d["answers"][turn].append(answer)
                d["refs"][turn].append([sample["outputs"][turn]])
            d["kv"].append(kv)
        log(f"  sample {n}: " + "; ".join(f"{label}: {res[label]['answers'][1][-1][:24]!r}" for label, *_ in rows[:2]))
    full = sum(res["full cache"]["kv"]) / len(samples)
    return {
        label: {
            "turn 1": metric(d["answers"][0], d["refs"][0]),
            "turn 2": metric(d["answers"][1], d["refs"][1]),
            "KV KiB": sum(d["kv"]) / len(samples) / 1024,
            "KV vs full": sum(d["kv"]) / len(samples) / full,
            "s/sample": d["s"] / len(samples),
            "example": [d["answers"][0][0][:60], d["answers"][1][0][:60]],
        }
        for label, d in res.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "bench-out" / "ruler")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10, help="the first N samples of niah_multiquery")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="policy class names")
    ap.add_argument("--reprefill", nargs="*", default=["SnapKV"], help="methods also run re-prefilled each turn")
    ap.add_argument("--max-new", type=int, default=32, help="greedy tokens per turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default=None, help="write this section of BENCHMARKS.md (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    log = stamped_log()

    from infertrix.models import load

    pkg = ruler_package()
    metric = module_from(pkg / "eval" / "synthetic" / "constants.py", "ruler_eval_constants").TASKS["niah"]["metric_fn"]
    question = single_key_question(pkg)
    samples = load_samples(args.data, args.length, TASK, args.samples)
    rows = grid(args.methods, args.ratio, args.reprefill)
    model, tok = load("smollm2")
    log(f"{len(samples)} samples, {len(rows)} cells; turn question: {question!r}")
    results = run(model, tok, samples, rows, question, args.max_new, metric, log)
    table = [{"cell": label, **{k: v for k, v in d.items() if k != "example"}} for label, d in results.items()]
    print(markdown_table(table))
    for label, d in results.items():
        print(f"{label}: e.g. {d['example']}")
    (args.data / "kvcache-multiturn.json").write_text(json.dumps(results, indent=1))
    if args.section:
        body = (f"SmolLM2-135M-Instruct (float32, sdpa), {args.threads} thread(s), on a 2-core machine shared with "
                f"other jobs (times are indicative). RULER's {TASK} at {args.length} tokens, the first "
                f"{len(samples)} samples: the context is prefilled (and compressed) first, then turn 1 asks for the "
                "first key's number with RULER's single-key question and answer prefix, and turn 2, on the same "
                "cache after turn 1's answer, for the second key's; greedy, at most "
                f"{args.max_new} tokens per turn, batch 1. Scores: RULER's string_match_all per turn, 0-100. Rows: "
                f"`<method>:{args.ratio}` compresses the grown cache again at each turn (a turn is a prefill chunk) "
                f"to {args.ratio} of every token seen evicted; `turns kept` sets prefill_min_tokens="
                f"{TURNS_KEPT_MIN_TOKENS}, so only the context is compressed; `re-prefilled` runs each turn on a "
                "fresh cache (no reuse: context and question compressed together). KV: the cache after turn 2.\n\n"
                + markdown_table(table))
        write_section(args.section, "A chat's two turns on one compressed cache (RULER niah_multiquery)", body,
                      command="flock /tmp/infertrix-bench.lock python -m benchmarks.kvcache_multiturn "
                      + " ".join(sys.argv[1:] if argv is None else argv))
    log("done")


if __name__ == "__main__":
    main()
