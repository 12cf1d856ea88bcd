"""What bounds Lookahead on open-ended prompts: the acceptance n-gram trees can reach, and what a wide verification costs.

    flock /tmp/infertrix-bench.lock taskset -c 0 python -m benchmarks.lookahead_bound --threads 1

Issue 20 asks Lookahead (n-gram trie drafts verified as token trees, ``speculative/lookahead.py``)
for 1.3x over prompt lookup on the story and question prompts of ``benchmarks/speculative.py`` at
batch 1. This script separates the two things that decide it, with the drafter's own choices out
of the way:

1. **Acceptance bound.** The plain greedy output of each prompt (``infertrix.eval.decoding``'s four
   story and four question prompts; ``benchmarks/speculative.py`` at batch 1 uses the first) is
   replayed: before each step the trie Lookahead builds (the prompt and the output so far) gives
   its ``N`` best nodes as a tree, and the step accepts the longest path that matches what greedy
   decoding produced next (greedy tree verification accepts exactly that), plus one token. Tokens
   per step for several ``N``, with verification free. ``warm``: the trie also holds the model's
   own greedy outputs on 24 held-out story openings and 24 held-out questions (none of them the
   measured prompts), as a trie shared across calls holds earlier answers (the Lookahead paper
   builds its trie from the training split's responses and evaluates on the test split).
2. **Verification cost.** The decode engine's forward of ``W`` new tokens after a 40-token prompt,
   relative to ``W = 1`` (median of 7, float32, the threads given).
3. **Speed estimate.** The drafter itself (``LookaheadDrafter``: adaptive tree size from the
   measured cost curve, its learnt reach scale) replayed on the same outputs; estimated speed over
   plain decoding = tokens x t(1) / sum of t(width) over its steps.
4. **Measured** (``--measure``): ``compare_decoding`` (the speculative benchmark's interleaved
   runs) for prompt lookup, Lookahead and Lookahead with the warm trie, story and question prompts
   at batch 1, greedy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import infertrix as ix
from benchmarks.report import markdown_table, write_section
from infertrix.engine import EngineCache
from infertrix.eval.decoding import QUESTIONS, STORIES, compare_decoding
from infertrix.speculative.budget import VerifyCost
from infertrix.speculative.drafter import DraftContext
from infertrix.speculative.lookahead import (
    Lookahead,
    LookaheadDrafter,
    LookaheadMemory,
    NGramTrie,
    grow_tree,
)
from infertrix.speculative.state import prepared_for

HELD_STORIES = [
    "The old clockmaker locked his shop for the last time and slipped the key into the river.",
    "Nobody in the village had ever climbed the hill behind the church until the summer Anna turned twelve.",
    "The letter arrived forty years late, addressed to a woman who no longer lived there.",
    "When the power went out across the city, the museum's night guard heard footsteps in the east wing.",
    "Tom had promised his grandmother he would never open the blue door in the cellar.",
    "The ship's cook was the first to notice that the stars were in the wrong places.",
    "She woke up on a beach with sand in her hair and no memory of how she had arrived.",
    "The robot had been sweeping the same street every morning for thirty years.",
    "A small girl sat on the steps of the library every day, waiting for someone who never came.",
    "The baker found a note inside a loaf of bread that he had not baked.",
    "On the night of the festival, every lantern in the town went out at once.",
    "The detective arrived at the manor just as the last guest was leaving.",
    "Deep in the forest stood a cottage with smoke rising from its chimney, though no one had lived there for years.",
    "The astronaut looked out of the window and saw a light where no light should have been.",
    "My brother and I found the map in the attic on the first rainy day of the holidays.",
    "The king's youngest daughter refused to marry any of the princes who came to the castle.",
    "The fisherman pulled up his net and found a bottle with a message inside.",
    "When the school bell rang at midnight, the caretaker knew something was wrong.",
    "The painter could only paint things that had not happened yet.",
    "A stranger walked into the inn, soaked from the rain, and asked for a room with no windows.",
    "The mountain village had been snowed in for a month when the wolves came down.",
    "Grandfather's garden had a gate that led nowhere, or so everyone believed.",
    "The twins had never been apart for a single day until the morning of the accident.",
    "In the city of glass towers, one old wooden house still stood at the end of the street.",
]
HELD_QUESTIONS = [
    "Why is the sky blue?", "How do airplanes stay in the air?", "What is photosynthesis and why is it important?",
    "How does the heart pump blood through the body?", "What causes earthquakes?", "Why do we need sleep?",
    "How do vaccines work?", "What is the difference between weather and climate?", "How does a rainbow form?",
    "Why does the moon have phases?", "What is inflation in economics?", "How do bees make honey?",
    "What causes thunder and lightning?", "How does the internet work?", "Why is exercise good for your health?",
    "What is the water cycle?", "How do magnets work?", "What are black holes?",
    "Why do birds migrate?", "How does a computer store information?", "What causes tides in the ocean?",
    "How do plants grow from seeds?", "What is the greenhouse effect?", "Why do we have different time zones?",
]
WIDTHS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
BUDGETS = (4, 8, 24, 48)


def greedy_outputs(model, tok, messages: list[str], batch: int, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy output ids up to and including eos) per message, through the chat template."""
    out = []
    for i in range(0, len(messages), batch):
        chunk = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False)
                 for m in messages[i : i + batch]]
        enc = tok(chunk, return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
        plen = enc.input_ids.shape[1]
        for r in range(ids.shape[0]):
            prompt = enc.input_ids[r][enc.attention_mask[r].bool()].tolist()
            gen = ids[r, plen:].tolist()
            if tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id) + 1]
            out.append((prompt, gen))
        print(f"generated {min(i + batch, len(messages))}/{len(messages)}", flush=True)
    return out


def trie_of(seqs: list[list[int]], depth: int, max_nodes: int) -> NGramTrie:
    trie = NGramTrie(depth, max_nodes)
    for s in seqs:
        trie.add(s, 0)
    return trie


def accepted(tree, truth: list[int]) -> int:
    """Tokens greedy tree verification accepts: the longest path of ``tree`` that ``truth`` starts with."""
    depth, ok, best = [], [], 0
    for tok, parent in zip(tree.tokens, tree.parents, strict=True):
        d = 0 if parent < 0 else depth[parent]
        hit = (parent < 0 or ok[parent]) and d < len(truth) and tok == truth[d]
        depth.append(d + 1)
        ok.append(hit)
        if hit:
            best = max(best, d + 1)
    return best


def bound(prompt: list[int], out: list[int], seed: list[list[int]], budget: int, cfg: Lookahead) -> float:
    """Tokens per step with the ``budget`` best trie nodes verified for free at every step."""
    trie = trie_of(seed, cfg.depth, cfg.max_trie_nodes)
    seq, added, i, steps = list(prompt), 0, 0, 0
    while i < len(out):
        added = trie.add(seq, added)
        node = trie.match(seq, cfg.prefix)
        a = accepted(grow_tree(node, budget, len(out) - i, 0.7)[0], out[i:]) if node is not None else 0
        seq += out[i : i + a + 1]
        i += a + 1
        steps += 1
    return len(out) / steps


def estimate(prompt: list[int], out: list[int], seed: list[list[int]], cost: dict[int, float], cfg: Lookahead) -> float:
    """Speed over plain decoding of the drafter's own steps (adaptive size, learnt scale), replayed."""
    vc = VerifyCost()
    vc.times = dict(cost)
    drafter = LookaheadDrafter(trie_of(seed, cfg.depth, cfg.max_trie_nodes), cfg.prefix, cfg.max_nodes, True)
    drafter.ctx = DraftContext(False, 1, 0, None, vc)
    drafter.added = [0]
    seq, i, seconds = list(prompt), 0, 0.0
    while i < len(out):
        draft = drafter.propose([seq], [len(out) - i])
        tree = draft.trees[0] if draft.trees else None
        a = accepted(tree, out[i:]) if tree is not None else 0
        seconds += vc.time(1 + (len(tree) if tree is not None else 0))
        drafter.observe([len(tree) if tree is not None else 0], [a])
        seq += out[i : i + a + 1]
        i += a + 1
    return len(out) * cost[1] / seconds


@torch.no_grad()
def cost_curve(model, repeats: int = 7) -> dict[int, float]:
    """Seconds of one engine forward of W new tokens after a 40-token prompt, per W (median)."""
    ids = torch.randint(3, 1000, (1, 40 + max(WIDTHS)), generator=torch.Generator().manual_seed(0))
    out = {}
    for w in WIDTHS:
        ts = []
        for _ in range(repeats):
            cache = EngineCache(model.config)
            model(input_ids=ids[:, :40], cache=cache, use_cache=True, logits_to_keep=1)
            t0 = time.perf_counter()
            model(input_ids=ids[:, 40 : 40 + w], cache=cache, use_cache=True, logits_to_keep=w)
            ts.append(time.perf_counter() - t0)
        out[w] = statistics.median(ts)
    return out


class WarmLookahead(Lookahead):
    """Lookahead whose trie starts from the held-out outputs (what a trie kept across calls would
    hold after answering them); a benchmark device, not a recipe."""

    seed_sequences: tuple = ()

    def _memory(self, model):
        return prepared_for(model, self, lambda: LookaheadMemory(trie_of(list(self.seed_sequences), self.depth,
                                                                         self.max_trie_nodes)))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the measured runs")
    ap.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = ix.models.load("smollm2")
    tok.padding_side = "left"
    ix.optimize(model)  # the engine, as every drafter runs on
    cfg = Lookahead()
    t0 = time.time()
    held = greedy_outputs(model, tok, [f"Continue this story:\n\n{s}" for s in HELD_STORIES] + HELD_QUESTIONS, 8,
                          args.new_tokens)
    seed = [p + o for p, o in held]
    tests = {"story": greedy_outputs(model, tok, [f"Continue this story:\n\n{s}" for s in STORIES], 1, args.new_tokens),
             "question": greedy_outputs(model, tok, list(QUESTIONS), 1, args.new_tokens)}
    cost = cost_curve(model)
    base = cost[1]
    rows = []
    for kind, pairs in tests.items():
        for j, (prompt, out) in enumerate(pairs):
            for name, s in (("cold (prompt + output)", []), ("warm (+ 48 held-out outputs)", seed)):
                row = {"prompts": kind, "prompt #": j, "tokens": len(out), "trie": name}
                for n in BUDGETS:
                    row[f"tokens/step, {n} nodes free"] = round(bound(prompt, out, s, n, cfg), 3)
                row["estimated x plain (drafter, measured costs)"] = round(estimate(prompt, out, s, cost, cfg), 3)
                rows.append(row)
                print(row, flush=True)
    cost_row = {f"W={w}": f"{1000 * t:.1f} ms ({t / base:.2f})" for w, t in cost.items()}
    print(cost_row, flush=True)
    measured = []
    if args.measure:
        ix.restore(model)
        warm = WarmLookahead()
        warm.seed_sequences = tuple(seed)
        variants = {"prompt_lookup": (ix.speculative.PromptLookup(),), "lookahead": (Lookahead(),),
                    "lookahead (warm trie)": (warm,)}
        for kind in ("story", "question"):
            for r in compare_decoding(model, tok, variants, kind, 1, "greedy", new_tokens=args.new_tokens,
                                      repeats=args.repeats):
                print(r, flush=True)
                measured.append({k: v for k, v in r.items() if k not in ("batch", "mode", "run")})
    wall = time.time() - t0
    body = (
        f"SmolLM2-135M-Instruct, float32, decode engine, {args.threads} thread(s), {args.new_tokens} new tokens, "
        f"{wall:.0f} s in all. What the numbers are: see the script's docstring. `prompt #` 0 is the prompt "
        "`benchmarks/speculative.py` measures at batch 1.\n\n"
        "**Acceptance with free verification, and the drafter's estimated speed at the measured costs**\n\n"
        + markdown_table(rows)
        + "\n**One engine forward of W new tokens after a 40-token prompt** (median of 7; ratio to W = 1)\n\n"
        + markdown_table([cost_row])
        + ("\n**Measured** (interleaved runs, median of "
           f"{args.repeats}; batch 1, greedy)\n\n" + markdown_table(measured) if measured else "")
    )
    print(body)
    if not args.no_write:
        write_section("lookahead-bound", "lookahead-bound: how far n-gram trees go on open-ended prompts", body)


if __name__ == "__main__":
    main(sys.argv[1:])
