"""The user's path end to end, as a new user walks it; every step checks what it claims (CI runs it).

    python examples/user_path.py [recipe]        # default: the README's recipe

1. load SmolLM2 and optimize it with the README's recipe;
2. ``pipeline("text-generation")`` on a short and a long prompt;
3. ``generate`` on a left-padded batch of 2: each row equals the row run alone;
4. lm-evaluation-harness (``HFLM``) on hand-made requests: log-likelihood (through the compressed
   KV cache, ``infertrix.eval.compressed_scoring``) and ``generate_until``;
5. ``save_pretrained`` then transformers' own ``from_pretrained``: bit-identical logits;
6. ``restore``.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import infertrix as ix

README_RECIPE = "w4a8,snapkv:0.5"


def main(recipe: str = README_RECIPE) -> None:
    torch.manual_seed(0)
    model, tok = ix.models.load("smollm2")
    ix.optimize(model, recipe)
    print(ix.describe(model))

    # 2. pipeline, short and long prompts (a KV policy must not fail on a prompt shorter than its window)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    short = gen("The capital of France is", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    long_prompt = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."] * 12)
    long = gen(long_prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    # 16-63 tokens: shorter than a SnapKV window plus its budget (this crashed before issue #16)
    mid_prompt = "My friend asked me to explain, in simple words and without any jargon at all, why the sky looks blue on a clear day and red at sunset. I said"
    mid = gen(mid_prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert 16 <= len(tok(mid_prompt).input_ids) <= 63 and len(mid) > len(mid_prompt)
    assert short.startswith("The capital of France is") and len(short) > len("The capital of France is"), short
    assert long.startswith(long_prompt) and len(long) > len(long_prompt)
    print("pipeline:", repr(short))

    # 3. a left-padded batch of 2; each row equals the same prompt run alone
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = ["Question: What is the capital of France?\nAnswer:", "Once upon a time"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=pad)
    width = batch.input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        alone = tok(prompt, return_tensors="pt")
        one = model.generate(**alone, max_new_tokens=12, do_sample=False, pad_token_id=pad)
        new_alone = one[0, alone.input_ids.shape[1]:].tolist()
        new_batch = out[row, width:].tolist()[: len(new_alone)]  # a row that stopped early is padded after
        assert new_batch == new_alone, (prompt, tok.decode(new_batch), tok.decode(new_alone))
    print("batch 2:", [tok.decode(o[width:], skip_special_tokens=True) for o in out])

    # 4. lm-evaluation-harness on hand-made requests
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print("lm-eval not installed (pip install 'infertrix[eval]'): skipped")
    else:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=1024)
        context = long_prompt + " The capital of France is"
        reqs = [Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate([" Paris", " a"])]
        with ix.eval.compressed_scoring(model):
            scores = [s for s, _ in lm.loglikelihood(reqs)]
        assert all(s < 0 for s in scores), scores
        text = lm.generate_until([Instance("generate_until", {}, ("Question: What is 2+2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), 0)])
        assert isinstance(text[0], str)
        print("lm-eval log-likelihoods (Paris, a):", [round(s, 3) for s in scores], "generate_until:", text)

    # 5. save_pretrained -> transformers' from_pretrained (runtime transforms are re-applied after loading)
    ids = tok("It is a truth universally acknowledged, that", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        loaded = AutoModelForCausalLM.from_pretrained(d)
        AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after), (before - after).abs().max()
    print("from_pretrained: logits bit-identical\n", ix.describe(loaded))

    # 6. restore
    print(ix.restore(model))
    print("user path: ok")


if __name__ == "__main__":
    main(*sys.argv[1:2])
