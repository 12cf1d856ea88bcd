"""Every KV-cache transform at every short prompt length: generate never fails, and a compression that
keeps more than the requested budget (the prompt is shorter than a window the method always keeps) is
counted in describe(); fixed budgets that cannot hold a method's fixed part are refused up front."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import KVPolicy, PolicyCache
from infertrix.kvcache.policy import MIN_BUDGET

# from the registry, not a hand list: a newly registered kvcache transform is tested too
KV_FAMILY = ix.available("kvcache")
KV_POLICIES = {name: cls for name, cls in KV_FAMILY.items() if issubclass(cls, KVPolicy)}


def tiny():
    return make_tiny(
        "llama",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def kept_more_count(model) -> int:
    """Layer compressions describe() reports as having kept more than their budget (0 if none)."""
    (entry,) = [t for t in ix.describe(model).to_dict()["transforms"] if t["stage"] == "cache"]
    line = entry["report"].get("kept_more_than_budget")
    return 0 if line is None else int(line.split()[0])


def generate_and_check(model, transform, ids, mask=None) -> None:
    """Greedy 2 tokens; for a policy, describe() counts a new kept-more case exactly when the prefill
    kept more than the requested budget in some row (per layer, summed; each row's budget follows its
    own length, its pads not counted)."""
    before = kept_more_count(model)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=2,
        min_new_tokens=2,  # a random model may pick the EOS id
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + 2)
    if not isinstance(transform, KVPolicy):
        return
    cache = out.past_key_values
    assert isinstance(cache, PolicyCache)
    layers = cache.evicting_layers
    lengths = [ids.shape[1]] * ids.shape[0] if mask is None else mask.sum(-1).tolist()  # each row's own budget
    kept, requested = [], []
    for b, n in enumerate(lengths):
        # a row's slots after its kept pads and fillers, less the token the decoding step appended
        first = [0 if (f := layer.first_slots(cache.row_pads)) is None else int(f[b]) for layer in layers]
        kept.append(sum(layer.stored_length - f - 1 for layer, f in zip(layers, first, strict=True)))
        requested.append(transform.requested(n) * len(layers))
    reported = kept_more_count(model) > before
    assert reported == any(k > r for k, r in zip(kept, requested, strict=True)), (
        f"{lengths} tokens: kept {kept}, requested {requested}, reported {reported}: "
        f"{ix.describe(model)}"
    )


@pytest.mark.parametrize("name", sorted(KV_FAMILY))
def test_every_prompt_length_generates_and_reports_keeping_more(name):
    model = tiny()
    transform = KV_FAMILY[name]()
    ix.optimize(model, transform)
    g = torch.Generator().manual_seed(0)
    for n in range(1, 81):
        generate_and_check(model, transform, torch.randint(3, 128, (1, n), generator=g))
    if isinstance(transform, KVPolicy):
        assert kept_more_count(model) > 0  # lengths 9-15 at least are kept whole
        text = str(ix.describe(model))
        line = ix.describe(model).to_dict()["transforms"][0]["report"]["kept_more_than_budget"]
        kept_more, _, steps = line.split()[:3]
        assert int(kept_more) <= int(steps), line  # counted in the same units
        assert "kept_more_than_budget" in text
        if transform.fixed_part()[0] > MIN_BUDGET:
            assert transform.fixed_part()[1] in text  # describe() names what is always kept
            if hasattr(transform, "window_size"):
                assert f"window_size={transform.window_size}" in text


@pytest.mark.parametrize("name", sorted(KV_FAMILY))
def test_left_padded_pairs_of_every_width_generate(name):
    model = tiny()
    transform = KV_FAMILY[name]()
    ix.optimize(model, transform)
    g = torch.Generator().manual_seed(1)
    for width in range(2, 81, 5):
        short = max(1, width - 1 - width // 3)
        ids = torch.randint(3, 128, (2, width), generator=g)
        mask = torch.ones_like(ids)
        ids[1, : width - short] = 0
        mask[1, : width - short] = 0
        generate_and_check(model, transform, ids, mask)


@pytest.mark.parametrize("name", sorted(KV_POLICIES))
def test_high_compression_keeps_the_minimum_budget_and_says_so(name):
    model = tiny()
    transform = KV_POLICIES[name](compression=0.95)
    ix.optimize(model, transform)
    g = torch.Generator().manual_seed(2)
    for n in (20, 80):
        generate_and_check(model, transform, torch.randint(3, 128, (1, n), generator=g))
    assert kept_more_count(model) > 0


@pytest.mark.parametrize("name", sorted(KV_POLICIES))
def test_fixed_budget_below_the_fixed_part_is_refused_before_the_model_changes(name):
    cls = KV_POLICIES[name]
    least = cls().min_budget()
    assert least >= MIN_BUDGET
    with pytest.raises(ConfigError, match=f"use budget >= {least}"):
        cls(budget=least - 1)
    cls(budget=least)
    model = tiny()
    with pytest.raises(ConfigError, match=f"use budget >= {least}"):
        ix.optimize(model, f"{name}(budget={least - 1})")
    assert ix.describe(model).transforms == []
    assert "generate" not in model.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_budget_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"the 32 tokens it always keeps \(the observation window, window_size=32\); use budget >= 32 or a smaller window_size"):
        ix.kvcache.SnapKV(budget=4)
    with pytest.raises(ConfigError, match=f"minimum of {MIN_BUDGET} tokens .*; use budget >= {MIN_BUDGET}, or a compression ratio"):
        ix.kvcache.H2O(budget=1)
    with pytest.raises(ConfigError, match=r"\(the attention sinks, sink_tokens=12\); use budget >= 12 or fewer sink_tokens"):
        ix.kvcache.StreamingLLM(sink_tokens=12, budget=10)
    assert ix.kvcache.SnapKV(window_size=4, budget=MIN_BUDGET).min_budget() == MIN_BUDGET


def test_kept_more_is_counted_per_layer_step_with_its_reason():
    model = tiny()
    ix.optimize(model, "snapkv:0.5")
    g = torch.Generator().manual_seed(3)
    report = lambda: ix.describe(model).to_dict()["transforms"][0]["report"]  # noqa: E731
    model.generate(torch.randint(3, 128, (1, 10), generator=g), max_new_tokens=1, pad_token_id=0)
    line = report()["kept_more_than_budget"]
    assert line.startswith("2 of 2 layer compression steps since optimize")
    assert "prompts shorter than prefill_min_tokens=16 are not compressed" in line
    model.generate(torch.randint(3, 128, (1, 40), generator=g), max_new_tokens=1, pad_token_id=0)
    line = report()["kept_more_than_budget"]
    assert line.startswith("4 of 4 layer compression steps")
    assert "SnapKV always keeps 32 tokens (the observation window, window_size=32)" in line
    model.generate(torch.randint(3, 128, (1, 64), generator=g), max_new_tokens=1, pad_token_id=0)
    assert report()["kept_more_than_budget"].startswith("4 of 6 layer compression steps")
    assert report()["tokens_stored"] == 32
