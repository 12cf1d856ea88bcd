"""The main job (`infertrix bench`): each family measured on its workload, end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import byte_tokenizer, make_tiny

from infertrix import available, cli
from infertrix.core.recipe import parse_recipe
from infertrix.eval import workloads


@pytest.mark.parametrize(
    "recipe, family",
    [
        ("baseline", "baseline"),
        ("w4a8", "quant"),
        ("skinny_linear", "quant"),
        ("uniform_skip:0.25", "skip"),
        ("kivi:4", "kvcache"),
        ("w4a8,snapkv:0.5", "kvcache"),
        ("w8a8,prompt_lookup", "speculative"),
        ("snapkv:0.5,prompt_lookup", "speculative"),
    ],
)
def test_a_recipe_is_measured_by_its_latest_stage(recipe, family):
    assert workloads.family_of(parse_recipe(recipe)) == family


def test_every_registered_transform_says_when_to_use_it():
    shipped = {name: cls for name, cls in available().items() if not name.startswith("_")}  # not tests' own
    missing = [name for name, cls in shipped.items() if not cls.use_when.strip()]
    assert not missing
    assert len({cls.use_when for cls in shipped.values()}) == len(shipped)


def test_main_job_runs_every_family_on_its_workload(tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_tiny("llama", vocab_size=259).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    md, js = tmp_path / "out.md", tmp_path / "out.json"
    recipes = ["skinny_linear", "uniform_skip:0.25", "streamingllm:0.5", "pyramidkv:0.99", "prompt_lookup", "offload"]
    argv = ["bench", "--model", str(folder), "--quick", "--threads", "1", "--kv-context", "200",
            "--spec-prompts", "rewrite", "--markdown", str(md), "--json", str(js)]
    for r in recipes:
        argv += ["--recipe", r]
    assert cli.main(argv) == 1  # a row failed (offload on a dense model); the others are still measured
    out = capsys.readouterr().out
    for heading in ("### quant", "### skip", "### kvcache: 200-token prompts", "### speculative", "### moe"):
        assert heading in out
    assert md.read_text() == out.rstrip("\n") + "\n"
    assert "s.get(" not in out and "-token prompt" in out  # every workload line is rendered
    rows = json.loads(js.read_text())["rows"]
    by = {(r["family"], r["recipe"]): r for r in rows}
    assert {f for f, _ in by} == {"quant", "skip", "kvcache", "speculative", "moe"}
    # every family has its own baseline, measured on its workload
    assert by["kvcache", "baseline"]["kv_ratio"] == 1.0 and by["kvcache", "baseline"]["decode_tok_s"] > 0
    assert by["speculative", "baseline"]["rewrite_speedup"] == 1.0
    # the KV workload sees the policy: half the tokens evicted, half the bytes
    assert 0.4 < by["kvcache", "streamingllm:0.5"]["kv_ratio"] < 0.6
    assert 0.0 <= by["kvcache", "streamingllm:0.5"]["passkey"] <= 1.0
    # a policy whose budget is below what it always keeps still runs (keeping that much)
    assert "error" not in by["kvcache", "pyramidkv:0.99"]
    # a recipe that cannot run on this model is an error row; the others are still measured
    assert "error" in by["moe", "offload"]
    assert "| offload | error: " in out
    # speculative decoding is lossless: token-identical to plain generate
    assert by["speculative", "prompt_lookup"]["rewrite_identical"] == "yes"
    assert by["speculative", "prompt_lookup"]["rewrite_accepted"] >= 1.0
    # quant and skip rows carry quality, agreement and speed against the same baseline
    assert by["quant", "skinny_linear"]["agreement"] == 1.0
    assert by["skip", "uniform_skip:0.25"]["weight_MiB"] < by["skip", "baseline"]["weight_MiB"]
    assert all(r["use_when"] for r in rows)


def test_compare_decoding_runs_plain_and_every_variant_on_the_base(monkeypatch):
    """``base`` goes under plain and under each variant (a drafter compared with plain decoding of
    the same quantized target), every run; the model is left as it was."""
    from infertrix.eval import decoding

    model, tok = make_tiny("llama", vocab_size=259), byte_tokenizer()
    seen = []
    real = decoding.optimize

    def spy(m, *transforms, **kw):
        seen.append(tuple(transforms))
        return real(m, *transforms, **kw)

    monkeypatch.setattr(decoding, "optimize", spy)
    B = ("w8a8(smooth_alpha=none)",)
    rows = decoding.compare_decoding(model, tok, {"pld": ("pld",)}, "rewrite", 1, "greedy", new_tokens=10,
                                     repeats=1, warmup_tokens=2, base=B)
    assert seen == [B] + [B, (*B, "pld")] * 2  # prefill timing, warm-up, one round
    assert [r["method"] for r in rows] == ["plain", "pld"]
    assert rows[1]["identical to plain"] == "yes"
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"  # restored after the last run
