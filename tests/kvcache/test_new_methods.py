"""What makes each of the newer KV methods that method, and that each decodes a left-padded batch of 4
exactly as its rows alone, also when it compresses during decoding (``decode_interval``)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rows_decode_as_alone, left_padded, make_tiny, small

import infertrix as ix
from infertrix.core import ConfigError
from infertrix.kvcache import CAKE, ChunkKV, ExpectedAttention, KeyDiff, LagKV, ScoreContext
from infertrix.kvcache.cake import layer_preference
from infertrix.kvcache.density import allocate

NEW_METHODS = [KeyDiff, ChunkKV, LagKV, ExpectedAttention]


def context(keys: torch.Tensor, queries: torch.Tensor | None = None, visible=None) -> ScoreContext:
    return ScoreContext(None, None, 0, keys, keys.clone(), queries, visible, 1.0)


def kept(policy, ctx: ScoreContext, target: int) -> list[int]:
    ctx.target = target
    scores = policy.score(ctx)
    if ctx.visible is not None:
        scores = scores.masked_fill(~ctx.visible[:, None, :], float("-inf"))
    return sorted(scores.topk(target, dim=-1).indices[0, 0].tolist())


def test_keydiff_keeps_the_keys_least_like_the_mean():
    keys = torch.zeros(1, 1, 10, 4)
    keys[..., 0] = 1.0  # eight keys along one direction (and of different norms) ...
    keys[0, 0, :, 0] *= torch.arange(1, 11).float()
    keys[0, 0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # ... and two that point elsewhere
    keys[0, 0, 7] = torch.tensor([-1.0, 0.0, 1.0, 0.0])
    assert kept(KeyDiff(), context(keys), 2) == [3, 7]
    # pads are left out of the mean: a padded row scores exactly as alone
    padded = torch.cat([torch.randn(1, 1, 3, 4) * 100, keys], dim=2)
    visible = torch.tensor([[False] * 3 + [True] * 10])
    alone = KeyDiff().score(context(keys))
    torch.testing.assert_close(KeyDiff().score(context(padded, visible=visible))[..., 3:], alone)


def test_chunkkv_keeps_whole_chunks_aligned_to_the_row_start():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 24, 8, generator=g)
    queries = torch.zeros(1, 1, 2, 8)
    queries[..., 0] = 50.0
    keys[0, 0, :, 0] = -1.0
    keys[0, 0, 5, 0] = 1.0  # one token the window attends to, in chunk 1 (tokens 4-7)
    policy = ChunkKV(window_size=2, kernel_size=1, chunk_size=4)
    # the window (22, 23) and all of chunk 1, never the attended token alone
    assert kept(policy, context(keys, queries), 6) == [4, 5, 6, 7, 22, 23]
    # a budget that cuts a chunk keeps its first tokens
    assert kept(policy, context(keys, queries), 4) == [4, 5, 22, 23]
    # three left pads shift the slots but not the chunks
    padded = torch.cat([torch.randn(1, 1, 3, 8, generator=g), keys], dim=2)
    visible = torch.tensor([[False] * 3 + [True] * 24])
    assert kept(policy, context(padded, queries, visible), 6) == [7, 8, 9, 10, 25, 26]


def test_chunkkv_shares_chunks_over_kv_heads_unless_told_per_head():
    keys = torch.zeros(1, 2, 24, 8)
    keys[..., 0] = -1.0
    keys[0, 0, [5, 13], 0] = 1.0  # head 0 attends half to chunk 1 (tokens 4-7), half to chunk 3 (12-15) ...
    keys[0, 1, 13, 0] = 1.0  # ... head 1 only to chunk 3
    queries = torch.zeros(1, 2, 2, 8)
    queries[..., 0] = 50.0

    def kept_by_head(policy):
        ctx = context(keys, queries)
        ctx.target = 6
        return [sorted(row) for row in policy.score(ctx).topk(6, dim=-1).indices[0].tolist()]

    shared = kept_by_head(ChunkKV(window_size=2, kernel_size=1, chunk_size=4))
    assert shared == [[12, 13, 14, 15, 22, 23]] * 2  # the chunk with the larger summed score, in both heads
    # per head, head 0's tie goes to the earlier chunk
    per_head = kept_by_head(ChunkKV(window_size=2, kernel_size=1, chunk_size=4, shared_heads=False))
    assert per_head == [[4, 5, 6, 7, 22, 23], [12, 13, 14, 15, 22, 23]]


def test_lagkv_scores_against_the_next_chunk_and_keeps_sinks_and_the_tail():
    g = torch.Generator().manual_seed(1)
    keys = torch.rand(1, 1, 14, 4, generator=g)  # sink 2, chunks 2-5, 6-9 scored; 10-13 is the tail
    keys[0, 0, 3] = torch.tensor([5.0, -5.0, 5.0, -5.0])  # far outside chunk 6-9's per-channel range
    keys[0, 0, 8] = torch.tensor([0.0, 9.0, 0.0, 9.0])  # ... and token 8 outside the tail's
    policy = LagKV(sink_tokens=2, lag_size=4)
    scores = policy.score(context(keys))[0, 0]
    assert bool((scores[[0, 1, 10, 11, 12, 13]] >= 1e29).all())  # sinks and tail always kept
    assert int(scores[2:6].argmax()) == 1 and int(scores[6:10].argmax()) == 2  # tokens 3 and 8
    assert kept(policy, context(keys), 8) == [0, 1, 3, 8, 10, 11, 12, 13]
    # left pads shift the slots but not the chunks
    padded = torch.cat([torch.randn(1, 1, 3, 4, generator=g), keys], dim=2)
    visible = torch.tensor([[False] * 3 + [True] * 14])
    torch.testing.assert_close(policy.score(context(padded, visible=visible))[..., 3:], policy.score(context(keys)))


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="chunk_size"):
        ChunkKV(chunk_size=0)
    with pytest.raises(ConfigError, match="lag_size"):
        LagKV(lag_size=1)
    with pytest.raises(ConfigError, match="smaller lag_size"):
        LagKV(lag_size=8, budget=12)
    with pytest.raises(ConfigError, match="tau1"):
        CAKE(tau1=0)


def padded_batch(seed: int, *lengths: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 128, (1, n), generator=g) for n in lengths]
    return *left_padded(rows), rows


def test_cake_prefers_layers_whose_attention_is_spread_and_shifting():
    s = 16
    fixed = torch.zeros(1, 1, 4, s)
    fixed[..., 0] = 1.0  # every query attends one token: no dispersion, no shift
    spread_still = torch.full((1, 1, 4, s), 1 / s)  # dispersed but the same for every query
    shifting = torch.eye(s)[None, None, :4] * 0.5 + 0.5 / s  # dispersed and shifting
    prefs = [layer_preference(p, 1.0, 1.0)[0] for p in (fixed, spread_still, shifting)]
    assert prefs[0] == 0 and prefs[1] == 0 and prefs[2] > 0
    assert layer_preference(torch.cat([fixed, shifting]), 1.0, 1.0) == [prefs[0], prefs[2]]  # one per row
    # the budgets then follow the preferences (DensityKV's allocation)
    assert allocate([0.0, 1.0, 3.0], 36, 4, 30) == [4, 10, 22]


def test_cake_spreads_the_total_budget_over_layers_and_decodes_a_padded_batch():
    model = make_tiny("llama", num_hidden_layers=4)
    ix.optimize(model, small(CAKE, budget=12, decode_interval=3))
    batch, mask, _ = padded_batch(5, 40, 17, 33, 26)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    stored = out.past_key_values.stored_lengths()  # after prefill, plus the one decoded token
    assert sum(stored) == 12 * len(stored)  # the uniform total (spread by preference)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (4, 52)
    assert all(n <= 12 * 4 for n in out.past_key_values.stored_lengths())  # recompressed while decoding


@pytest.mark.parametrize("decode_interval", [0, 3])
@pytest.mark.parametrize("cls", NEW_METHODS, ids=lambda c: c.__name__)
def test_left_padded_batch_of_four_decodes_as_its_rows_alone(cls, decode_interval):
    model = make_tiny("llama")
    ix.optimize(model, small(cls, budget=12, decode_interval=decode_interval))
    # every row is a prefill (>= prefill_min_tokens): a shorter row alone is not compressed at prefill
    # and so reaches decode_interval on another schedule than in the batch (rows shorter than the
    # budget, padded, are covered by test_policies.py)
    batch, mask, rows = padded_batch(4, 28, 17, 22, 19)
    assert_rows_decode_as_alone(model, batch, mask, rows, 10)
