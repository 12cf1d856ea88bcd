"""A chat's turns on one compressed cache: transformers' cache-reuse pattern through generate.

Turn 2 is ``generate(torch.cat([out1.sequences, new_ids], 1), cache=<turn 1's cache>)``: generate
feeds only the tokens the cache has not seen, at positions that continue from every token seen.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import byte_tokenizer, kv_policies, make_tiny
from transformers import DynamicCache, pipeline

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import H2O, KIVI, KeyDiff, PolicyCache, SnapKV, StreamingLLM, new_cache

FIRST, NEW, MORE = 30, 5, 20  # turn 1's prompt, tokens generated per turn, turn 2's new message


def ids_of(seed: int, *lengths: int, rows: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (rows, n), generator=g) for n in lengths]


def generate(model, ids, cache, mask=None):
    return model.generate(
        ids, attention_mask=mask, cache=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
        return_dict_in_generate=True, output_logits=True, pad_token_id=0,
    )


def two_turns(model, first, more, cache=None, mask=None):
    """(sequences, logits [B, 2 x NEW, V], cache) of two turns; with ``cache=None`` turn 2 continues on
    the cache generate returned from turn 1."""
    out1 = generate(model, first, cache, mask)
    cache = out1.cache if cache is None else cache
    ids2 = torch.cat([out1.sequences, more], 1)
    mask2 = None if mask is None else torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
    out2 = generate(model, ids2, cache, mask2)
    return out2.sequences, torch.stack(out1.logits + out2.logits, 1), cache


class Positions:
    """The position ids ``module`` is called with: the rotary embedding's (those the module path
    uses), or the model's (those generate hands the module path and the engine alike)."""

    def __init__(self, module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self.note, with_kwargs=True)

    def note(self, module, args, kwargs):
        self.seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())

    def take(self) -> list[list]:
        seen, self.seen = self.seen, []
        return [p.tolist() for p in seen]


def plain_two_turns(model, first, more, mask=None, where=None):
    """The same two turns with transformers' own cache, before anything is applied to the model, and
    the positions ``where`` (default: the rotary embedding) was called with."""
    positions = Positions(where or model.model.rotary_emb)
    ref = two_turns(model, first, more, DynamicCache(), mask)
    positions.handle.remove()
    return ref, positions.take()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize(
    "policy",
    [SnapKV(window_size=4, compression=0.0), StreamingLLM(sink_tokens=2, compression=0.0), H2O(budget=512),
     KIVI(bits=4, group_size=4, residual_length=512)],
    ids=lambda p: type(p).__name__,
)
@pytest.mark.parametrize("path", ["engine", "engine(enabled=false)"])
@pytest.mark.parametrize("handoff", ["new_cache", "returned"])
def test_nothing_evicted_is_token_identical_to_plain(arch, policy, path, handoff):
    """Ratio 0 or a budget larger than the chat: both turns equal transformers' own two turns."""
    model = make_tiny(arch)
    first, more = ids_of(0, FIRST, MORE)
    (ref_seq, ref_logits, _), _ = plain_two_turns(model, first, more)
    ix.optimize(model, policy, path)
    seq, logits, cache = two_turns(model, first, more, new_cache(model) if handoff == "new_cache" else None)
    assert isinstance(cache, PolicyCache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == FIRST + NEW + MORE + NEW - 1


COMPRESSING = [
    SnapKV(window_size=4, compression=0.5),
    StreamingLLM(sink_tokens=2, compression=0.5),
    KeyDiff(compression=0.5),
    H2O(compression=0.5),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("policy", [*COMPRESSING, KIVI(bits=2, group_size=4, residual_length=4)],
                         ids=lambda p: type(p).__name__)
def test_compressed_turns_keep_the_uncompressed_positions_and_budget(arch, policy):
    model = make_tiny(arch)
    first, more = ids_of(1, FIRST, MORE)
    _, ref_positions = plain_two_turns(model, first, more)
    ix.optimize(model, policy, "engine(enabled=false)")
    positions = Positions(model.model.rotary_emb)
    _, _, cache = two_turns(model, first, more)
    assert positions.take() == ref_positions
    seen = FIRST + NEW + MORE + NEW - 1
    assert cache.get_seq_length() == seen == cache.seen_tokens().shape[1]
    if not isinstance(policy, KIVI):  # turn 2's prefill compresses to the ratio of every token seen
        at_prefill = FIRST + NEW + MORE
        assert cache.stored_lengths() == [math.ceil(0.5 * at_prefill) + NEW - 1] * 4


@pytest.mark.parametrize("policy", kv_policies(compression=0.5), ids=lambda p: type(p).__name__)
def test_every_policy_continues_a_chat_at_the_uncompressed_positions(policy):
    """Every registered policy, the engine on (its default): generate hands every forward of the chat
    the positions of the uncompressed chat (the engine uses them as given)."""
    model = make_tiny("llama")
    first, more = ids_of(10, FIRST, MORE)
    _, ref_positions = plain_two_turns(model, first, more, where=model)
    ix.optimize(model, policy)
    positions = Positions(model)
    _, logits, cache = two_turns(model, first, more)
    assert positions.take() == ref_positions
    assert cache.get_seq_length() == FIRST + NEW + MORE + NEW - 1
    assert max(cache.stored_lengths()) < cache.get_seq_length() and torch.isfinite(logits).all()


@pytest.mark.parametrize("policy", COMPRESSING[:2], ids=lambda p: type(p).__name__)
def test_compressed_turns_on_the_engine_equal_the_module_path(policy):
    model = make_tiny("llama")
    first, more = ids_of(2, FIRST, MORE)
    results = []
    for path in ("engine", "engine(enabled=false)"):
        ix.optimize(model, policy, path)
        results.append(two_turns(model, first, more))
        ix.restore(model)
    (seq, logits, cache), (ref_seq, ref_logits, ref_cache) = results
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert cache.stored_lengths() == ref_cache.stored_lengths()


@pytest.mark.parametrize(
    "policy",
    [SnapKV(window_size=4, budget=12), StreamingLLM(sink_tokens=2, budget=12), KeyDiff(budget=12), H2O(budget=12)],
    ids=lambda p: type(p).__name__,
)
@pytest.mark.parametrize("path", ["engine", "engine(enabled=false)"])
def test_left_padded_pair_equals_each_row_alone(policy, path):
    """Batch 2, turn 1 left-padded, both rows' new messages of one length: each row is itself alone."""
    model = make_tiny("llama")
    rows = ids_of(3, FIRST, FIRST - 9)
    (more,) = ids_of(4, MORE, rows=2)
    ix.optimize(model, policy, path)
    batch = torch.zeros(2, FIRST, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, FIRST - r.shape[1]:], mask[i, FIRST - r.shape[1]:] = r[0], 1
    seq, logits, _ = two_turns(model, batch, more, new_cache(model), mask)
    for i, r in enumerate(rows):
        alone_seq, alone_logits, _ = two_turns(model, r, more[i : i + 1], new_cache(model))
        assert torch.equal(seq[i, FIRST - r.shape[1]:], alone_seq[0]), f"row {i}"
        torch.testing.assert_close(logits[i], alone_logits[0], atol=2e-4, rtol=1e-4)


def test_only_the_new_tokens_with_the_whole_mask_equal_the_whole_conversation():
    """transformers' other form of the next turn: the new ids only, the attention mask of them all."""
    model = make_tiny("llama")
    first, more = ids_of(5, FIRST, MORE)
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    seq, logits, _ = two_turns(model, first, more)
    cache = new_cache(model)
    out1 = generate(model, first, cache)
    unseen = torch.cat([out1.sequences[:, -1:], more], 1)  # turn 1's last token was never fed
    mask = torch.ones(1, out1.sequences.shape[1] + MORE, dtype=torch.long)
    out2 = generate(model, unseen, cache, mask)
    assert torch.equal(out2.sequences[0, -NEW:], seq[0, -NEW:])


def test_a_next_turn_that_does_not_continue_the_cache_is_refused_before_it_changes():
    model = make_tiny("llama")
    first, more = ids_of(6, FIRST, MORE)
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    cache = new_cache(model)
    out1 = generate(model, first, cache)
    before = (cache.get_seq_length(), cache.stored_lengths())
    without_answer = torch.cat([first, more], 1)  # the previous answer left out
    with pytest.raises(ConfigError, match=r"do not start with the 34 tokens .* torch.cat\(\[previous_output"):
        generate(model, torch.cat([without_answer, more], 1), cache)
    with pytest.raises(ConfigError, match="given 20 tokens on a cache that has already seen 34"):
        generate(model, more, cache)  # the new message alone, without the whole conversation's mask
    with pytest.raises(ConfigError, match="2 rows on a cache of 1 rows"):
        generate(model, torch.cat([out1.sequences, more], 1).repeat(2, 1), cache)
    assert (cache.get_seq_length(), cache.stored_lengths()) == before
    generate(model, torch.cat([out1.sequences, more], 1), cache)  # the right next turn still runs


def test_the_record_of_seen_tokens_follows_crop_and_row_selection():
    model = make_tiny("llama")
    (first,) = ids_of(11, FIRST, rows=2)
    ix.optimize(model, SnapKV(window_size=4, compression=0.5))
    cache = new_cache(model)
    seq = generate(model, first, cache).sequences
    assert torch.equal(cache.seen_tokens(), seq[:, :-1])
    cache.crop(-2)  # the last decoded tokens are still stored exactly
    assert torch.equal(cache.seen_tokens(), seq[:, :-3])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.seen_tokens(), seq[1:, :-3])
    generate(model, torch.cat([seq[1:, :-3], seq[1:, -3:]], 1), cache)  # continues after the crop


def test_pads_inside_a_batched_next_turn_are_refused_before_the_cache_changes():
    """New messages of different lengths, left-padded: pads after the rows' tokens."""
    model = make_tiny("llama")
    (first,) = ids_of(7, FIRST, rows=2)
    (more,) = ids_of(8, MORE, rows=2)
    ix.optimize(model, StreamingLLM(sink_tokens=2, compression=0.5))
    cache = new_cache(model)
    out1 = generate(model, first, cache)
    mask = torch.ones(2, out1.sequences.shape[1] + MORE, dtype=torch.long)
    mask[1, out1.sequences.shape[1] : out1.sequences.shape[1] + 3] = 0
    before = cache.stored_lengths()
    with pytest.raises(ConfigError, match="needs left padding .* row 1 .* same length"):
        generate(model, torch.cat([out1.sequences, more], 1), cache, mask)
    assert cache.stored_lengths() == before


def test_another_cache_warns_once_that_it_is_filled_uncompressed():
    model = make_tiny("llama")
    (first,) = ids_of(9, FIRST)
    ix.optimize(model, "snapkv:0.5")
    with pytest.warns(UserWarning, match="given a DynamicCache, which it fills uncompressed"):
        generate(model, first, DynamicCache())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, first, DynamicCache())
    assert not [w for w in caught if "uncompressed" in str(w.message)]


def test_pipeline_chat_continues_on_the_compressed_cache():
    """text-generation's chat form, with the cache passed through to generate on each turn."""
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    model = make_tiny("llama", vocab_size=259)
    chat = [{"role": "user", "content": "The key is 4172. " * 3}]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    # printable ASCII only: a random model's other bytes decode to U+FFFD, which the next turn's template
    # re-tokenizes differently (the check refuses that; here each turn must continue the last)
    ascii_ids = set(tok("".join(map(chr, range(32, 127))), add_special_tokens=False).input_ids)
    others = [[i] for i in range(len(tok)) if i not in ascii_ids]
    generated = {}
    for name in ("plain", "ratio 0", "snapkv"):
        ix.restore(model)
        cache = DynamicCache()
        if name != "plain":
            ix.optimize(model, SnapKV(window_size=4, compression=0.0 if name == "ratio 0" else 0.5))
            cache = new_cache(model)
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, bad_words_ids=others, cache=cache)
        turn1 = pipe(chat, **kw)[0]["generated_text"]
        turn2 = pipe(turn1 + [{"role": "user", "content": "What is the key?"}], **kw)[0]["generated_text"]
        generated[name] = turn2
        templated = tok.apply_chat_template(turn2[:-1], add_generation_prompt=True)["input_ids"]
        assert cache.get_seq_length() == len(templated) + 6 - 1
        if name == "snapkv":
            assert max(cache.stored_lengths()) < cache.get_seq_length()
    assert generated["ratio 0"] == generated["plain"]
