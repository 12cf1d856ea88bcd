"""vLLM CPU tensor parallelism on our exports, with a model whose heads divide by 2.

    python benchmarks/vllm_tp_tiny.py --out-dir /tmp/vllm-tp-tiny

SmolLM2 (9 heads, 3 KV heads) cannot run at ``tensor_parallel_size=2``: vLLM refuses it in its config
check. This builds a small random Llama with SmolLM2's tokenizer and vocabulary (hidden 256, 8 heads,
4 KV heads, 4 layers, weights drawn with std 0.2; seeded), saves it with ``save_pretrained``, exports ``w8a8(smooth_alpha=none)``
and ``w4a16(symmetric=true)`` with ``infertrix.export``, and runs each folder (float too) through
benchmarks/vllm_runner.py at tensor_parallel_size 1 and 2 (vLLM's CPU workers want a core each; a
2-core machine gives exactly that). W4A16 runs both ways on AMX CPUs (docs/scale.md, "vLLM CPU").
Prints one table: greedy agreement with our model of the same recipe and with vLLM's own TP=1 run;
per position, fed our continuation (teacher-forced), the share of positions where vLLM's top token is
ours and is its TP=1 top token, and the largest difference from TP=1 in the log-prob of our token;
tokens/s, or what vLLM raised. Random weights make near-ties common and vLLM runs quantized folders in
bfloat16, so one flipped near-tie ends greedy agreement: read the per-position columns first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
            initializer_range=0.2)  # at SmolLM2's 0.02 a random model repeats one token; at 0.2 it does not


def build(out_dir: Path, new_tokens: int) -> tuple[dict[str, Path], dict[str, dict], str]:
    """The float folder and one export per scheme; per recipe our greedy tokens and, fed those, our top token
    at each of their positions; the prompts' ids."""
    from scale import W4A16, folder_name
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import infertrix as ix
    from infertrix.eval.agreement import AGREEMENT_PROMPTS, greedy_tokens
    from infertrix.models import cache_dir, load, smollm2_gguf_path

    load("smollm2")  # the cached transformers folder: its tokenizer and config
    smol = cache_dir() / "models" / f"smollm2-{smollm2_gguf_path().stat().st_size}"
    tok = AutoTokenizer.from_pretrained(smol)
    float_folder = out_dir / "float"
    if not (float_folder / "config.json").exists():
        config = LlamaConfig.from_pretrained(smol, **TINY)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(float_folder)
        tok.save_pretrained(float_folder)
    torch.set_num_threads(1)
    folders, ours = {"": float_folder}, {}
    ids = [tok(p).input_ids for p in AGREEMENT_PROMPTS]
    for recipe in ["", "w8a8(smooth_alpha=none)", W4A16]:
        model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=torch.float32)
        if recipe:
            ix.optimize(model, recipe)
            folders[recipe] = out_dir / folder_name(recipe)
            ix.export(model, folders[recipe], format="compressed-tensors")
            tok.save_pretrained(folders[recipe])
        tokens = greedy_tokens(model, tok, AGREEMENT_PROMPTS, max_new_tokens=new_tokens)
        with torch.no_grad():  # logits[len(p) - 1 + j] predicts continuation token j
            top = [model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)].argmax(-1).tolist()
                   for p, c in zip(ids, tokens, strict=True)]
        ours[recipe] = {"tokens": tokens, "forced_top": top}
    return folders, ours, json.dumps(ids)


def forced_stats(r: dict, ours_top: list[list[int]], one: dict) -> tuple[str, str, str]:
    """Fed our continuation: top token same as ours, same as TP=1's, max |log-prob of our token - TP=1's|."""
    if "forced" not in r:
        return "-", "-", "-"
    pos = [x for row in r["forced"] for x in row]
    same = sum(x[0] == t for row, top in zip(r["forced"], ours_top, strict=True) for x, t in zip(row, top, strict=True))
    if "forced" not in one or one is r:
        return f"{100 * same / len(pos):.0f}%", "-", "-"
    ref = [x for row in one["forced"] for x in row]
    same1 = sum(a[0] == b[0] for a, b in zip(pos, ref, strict=True))
    diff = max(abs(a[2] - b[2]) for a, b in zip(pos, ref, strict=True))
    return f"{100 * same / len(pos):.0f}%", f"{100 * same1 / len(pos):.0f}%", f"{diff:.3f}"


def report(ours: dict[str, dict], vllm: dict) -> str:
    from scale import agreement

    lines = ["| recipe | TP | greedy agreement with ours | with vLLM TP=1 | fed ours: top token ours | "
             "top token TP=1's | max \\|log-prob - TP=1's\\| | tok/s batch 1 | tok/s batch 16 | load s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in vllm.items():
        recipe, tp, *extra = key.split("|")
        one = vllm.get("|".join([recipe, "1", *extra]), {})
        toks = r.get("tokens")
        agree = agreement(toks, ours[recipe]["tokens"]) if toks else "-"
        f_ours, f_one, f_diff = forced_stats(r, ours[recipe]["forced_top"], one)
        agree1 = agreement(toks, one["tokens"]) if toks and one.get("tokens") and tp != "1" else "-"
        rates = r.get("tok_s")
        r1, r16 = (f"{rates['1']:.1f}", f"{rates['16']:.1f}") if rates else ("-", "-")
        note = " ".join(extra) if "error" not in r else r["error"].splitlines()[0][:200].replace("|", "/")
        if r.get("int4_path"):
            note = f"{note} {r['int4_path']}".strip()
        load_s = f"{r['load_s']:.0f}" if "load_s" in r else "-"
        lines.append(f"| `{recipe or 'float'}` | {tp} | {agree} | {agree1} | {f_ours} | {f_one} | {f_diff} | {r1} | {r16} "
                     f"| {load_s} | {note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/vllm-tp-tiny"))
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from scale import W4A16, run_vllm_folders

    folders, ours, ids = build(args.out_dir, args.new_tokens)
    off = {"VLLM_CPU_INT4_W4A8": "0"}
    runs = [(r, tp, {}) for r in folders for tp in (1, 2)] + [(W4A16, tp, off) for tp in (1, 2)]
    forced = {r: json.dumps(ours[r]["tokens"]) for r in folders}
    vllm = run_vllm_folders(args.out_dir, folders, runs, ids, args.new_tokens, forced)
    (args.out_dir / "vllm_tp_tiny.json").write_text(json.dumps({"ours": ours, "vllm": vllm}))
    print(report(ours, vllm))


if __name__ == "__main__":
    main()
