"""Speculative decoding on SmolLM2-135M-Instruct: decode speed against plain ``generate``.

    flock /tmp/infertrix-bench.lock python -m benchmarks.speculative [--kinds rewrite] [--batches 1]

Three prompt kinds, four prompts each (batch 4 uses all four, left-padded; batch 1 the first), all
through the instruct model's chat template: ``rewrite`` (correct the spelling of a passage of
*Pride and Prejudice*, shipped with infertrix, into which a few letter swaps were introduced: the
model copies most of the passage), ``story`` (continue a story opening), ``question`` (answer a
question). Greedy and sampling at temperature 0.7. Drafters: prompt lookup (cost-aware adaptive
length), self-speculation through skip-family plans (on-line search over attention-drop and
ShortGPT plans), the quantized self-draft (W8A8 or W4A8 copy), Lookahead (n-gram trie, token-tree
verification), and a draft model that is SmolLM2 truncated to its first 20 of 30 layers (SmolLM2-135M
is the smallest model of its tokenizer; this draft loses to plain decoding, which the never-slower
guard must catch).

For each (kind, batch, mode) the runs are interleaved (plain, drafter, drafter..., plain, ...) so
that load drift hits all alike; figures are medians of the repeats. Decode tokens/s = (generated
tokens - first tokens) / (generate time - prefill time), where generated tokens count each row up
to its eos and the prefill time is the median time of ``generate(max_new_tokens=1)``. Greedy rows
record whether the output is token-identical to plain ``generate`` (it must be). Mean accepted
length = tokens emitted per row per verification forward (1.0 = no gain).

The prompts and the interleaved measurement are ``infertrix.eval.decoding`` (shared with the main
job, ``infertrix bench``); this script adds batches, sampling and the Skinny rows.

Rows accumulate in ``--results`` (JSON), so the matrix can be measured in several short locked
runs; every run rewrites the BENCHMARKS.md section from all rows gathered so far.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch

import infertrix as ix
from benchmarks.report import markdown_table, write_section
from infertrix.eval.decoding import compare_decoding


def truncated_copy(model, keep: int):
    """The model without its last layers (its final norm and head kept): a same-tokenizer draft that
    costs ``keep / layers`` of a step per token and agrees with the model far less, so drafting with
    it loses to plain decoding; the never-slower guard must notice (gain.py)."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:keep]
    draft.config.num_hidden_layers = keep
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:keep]
    return draft.eval()


DRAFTERS = {
    "lookahead": lambda: ix.speculative.Lookahead(),
    "lookahead(per call)": lambda: ix.speculative.Lookahead(shared=False),
    "jacobi": lambda: ix.speculative.Jacobi(),
    "jacobi(window 4)": lambda: ix.speculative.Jacobi(window=4),
    "draft_model(truncated 20/30)": None,  # built from the model (drafters())
    "prompt_lookup": lambda: ix.speculative.PromptLookup(),
    "prompt_lookup(fixed 10)": lambda: ix.speculative.PromptLookup(num_tokens=10, adaptive=False),
    "self_speculative": lambda: ix.speculative.SelfSpeculative(),
    "quantized_self": lambda: ix.speculative.QuantizedSelf(),
    "quantized_self(w4)": lambda: ix.speculative.QuantizedSelf(weight_bits=4),
    "cascade": lambda: ix.speculative.Cascade(),
}


def drafters(names: list[str], model) -> dict[str, tuple]:
    """Transforms per variant name, reused across runs (self-speculation keeps its plan search, the
    quantized self-draft its W4A8 copy).
    ``NAME+skinny`` adds the Skinny float kernels (``skinny_linear``) under the drafter;
    ``skinny_linear`` alone is plain decoding on them."""
    make = dict(DRAFTERS)
    make["draft_model(truncated 20/30)"] = lambda: ix.speculative.DraftModel(draft=truncated_copy(model, 20))
    out = {}
    for n in names:
        if n == "skinny_linear":
            out[n] = (ix.quant.Skinny(),)
        elif n.endswith("+skinny"):
            out[n] = (ix.quant.Skinny(), make[n.removesuffix("+skinny")]())
        else:
            out[n] = (make[n](),)
    return out


def _key(row: dict) -> tuple:
    """What one row measures: a later run of the same replaces it."""
    return row.get("target", ""), row["prompts"], row["batch"], row["mode"], row["method"]


def render(rows: list[dict], args) -> str:
    order = {"rewrite": 0, "story": 1, "question": 2}
    latest = max((r.get("run", "") for r in rows), default="")
    # a block's rows of the latest run first, rows kept from earlier runs after them
    rows = sorted(rows, key=lambda r: (r.get("target", ""), order.get(r["prompts"], 9), r["batch"],
                                       r["mode"] != "greedy", r.get("run", "") != latest))
    if any("target" in r for r in rows):
        rows = [{"target": r.get("target", "float32"), **r} for r in rows]
    if not any(r.get("vs plain + skinny") for r in rows):  # no Skinny rows: the column says nothing
        rows = [{k: v for k, v in r.items() if k != "vs plain + skinny"} for r in rows]
    return markdown_table(rows)


def measure(model, tok, transforms, kind, batch, mode, args) -> list[dict]:
    """``infertrix.eval.decoding.compare_decoding`` plus the 'vs plain + skinny' column: a drafter's
    own gain where the Skinny kernels also speed up plain decoding."""
    rows = compare_decoding(model, tok, transforms, kind, batch, mode, new_tokens=args.new_tokens,
                            repeats=args.repeats, warmup_tokens=args.warmup_tokens,
                            base=(args.base,) if args.base else ())
    tps_of = {r["method"]: r["decode tok/s"] for r in rows}
    out = []
    for r in rows:
        name = r["method"]
        skinny = (round(r["decode tok/s"] / tps_of["skinny_linear"], 3)
                  if name.endswith("+skinny") and "skinny_linear" in tps_of else "")
        row = {"target": args.base} if args.base else {}
        for k, v in r.items():
            row[k] = v
            if k == "speed-up":
                row["vs plain + skinny"] = skinny
        out.append(row)
        print(row, flush=True)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=40, help="tokens of the warm-up round (long enough "
                    "for the self-speculative plan search to finish)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="*", default=["rewrite", "story", "question"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--modes", nargs="*", default=["greedy", "sample"])
    ap.add_argument("--drafters", nargs="*", default=["prompt_lookup", "quantized_self", "lookahead",
                    "self_speculative", "draft_model(truncated 20/30)"], help=f"of {', '.join(DRAFTERS)}, "
                    "and NAME+skinny / skinny_linear (the Skinny kernels, for the module path)")
    ap.add_argument("--base", default="", help="a recipe under plain and every drafter, e.g. "
                    "'w4a8(quantize_lm_head=true)' or 'w4a8(quantize_lm_head=true),snapkv:0.5': drafters "
                    "compared with plain decoding of that target")
    ap.add_argument("--section", default="speculative", help="BENCHMARKS.md section to (re)write")
    ap.add_argument("--note", default="", help="a sentence added to the section's description")
    ap.add_argument("--results", default="bench-out/speculative.json", help="rows gathered so far (JSON)")
    ap.add_argument("--fresh", action="store_true", help="start a new results file")
    ap.add_argument("--blocks", nargs="*", default=None, help="kind:batch:mode blocks to measure, in this order "
                    "(instead of kinds x batches x modes), e.g. rewrite:1:greedy story:4:sample")
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from --results, measure nothing")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = Path(args.results)
    rows = [] if args.fresh or not path.exists() else json.loads(path.read_text())
    if args.blocks is not None:
        blocks = [(k, int(b), m) for k, b, m in (x.split(":") for x in args.blocks)]
    else:
        blocks = [(k, b, m) for k in args.kinds for b in args.batches for m in args.modes]
    if not args.render_only:
        model, tok = ix.models.load("smollm2")
        tok.padding_side = "left"
        transforms = drafters(args.drafters, model)
        for kind, batch, mode in blocks:
            new = measure(model, tok, transforms, kind, batch, mode, args)
            keys = {_key(r) for r in new}
            rows = [r for r in rows if _key(r) not in keys] + new
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))
        for ts in transforms.values():
            for t in ts:
                if hasattr(t, "drafter_report"):
                    print(type(t).__name__, t.drafter_report(model), flush=True)
    table = render(rows, args)
    print(table)
    if not args.no_write:
        targets = sorted({r.get("target", "") for r in rows})
        target = ("the `target` column's recipe (plain and every drafter run on it)" if any(targets)
                  else "float32")
        body = (
            f"SmolLM2-135M-Instruct, target {target}, {args.threads} thread(s), {args.new_tokens} new tokens, "
            f"median of {args.repeats} interleaved repeats after a short warm-up, each (prompts, batch, "
            "mode) block measured within one run. Plain and every drafter run with `optimize`'s defaults "
            "(the decode engine), so a speed-up is the drafter's own. Decode tok/s counts each row's tokens "
            "up to its eos, after the prefill (timed separately). Sampling rows differ from plain by design "
            "(same distribution, different draws), so their token counts differ too. `quantized_self` drafts "
            "with a W8A8 copy of the float weights (the default), `quantized_self(w4)` with a W4A8 copy, both on "
            "the model's own KV cache (QSpec: no draft cache, no catch-up over the prompt); `cascade` is the W8A8 "
            "self-draft checking n-gram guesses in each of its forwards and extended by an n-gram tail; "
            "`draft_model(truncated 20/30)` is SmolLM2 cut to its first 20 layers (SmolLM2-135M is the "
            "smallest model of its tokenizer; a draft that loses, which the never-slower guard must catch). "
            "`skinny_linear` / `X+skinny` rows (module path only, older runs): the Skinny float kernels. "
            + args.note + "\n\n" + table
        )
        title = (f"speculative: decode speed on SmolLM2{', quantized targets' if any(targets) else ''}, "
                 f"{args.threads} thread(s)")
        write_section(args.section, title, body,
                      command="python -m benchmarks.speculative " + " ".join(
                          shlex.quote(a) for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")))


if __name__ == "__main__":
    main(sys.argv[1:])
