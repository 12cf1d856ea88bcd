"""Token trees on the decode engine: a forward given SpecInfer's 4-D tree mask runs on the engine,
and each node's logits are the bits of the same token at the end of a linear window of its path
(row alone, no padding), on every architecture and linear kind; so greedy tree verification is
token-identical to plain decoding on quantized targets too. A 4-D mask that is not a tree over a
left-padded cache takes the module path, and says so."""

from __future__ import annotations

import pytest
import torch
from test_engine import ARCHS, build, tokens

import infertrix as ix
from infertrix.engine import EngineCache, engine_runtime
from infertrix.ops.engine import tree_paths

PARENTS = [-1, 0, 0, 1, 1, 3, 2, 6, 5]  # slot 0 the root; depths 0 1 1 2 2 3 2 3 4


def _forward(model, ids, mask, positions, cache):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                     logits_to_keep=ids.shape[1]).logits


def _prefilled(model, prompts: list[torch.Tensor]):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    cache = EngineCache(model.config)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    _forward(model, ids, mask, positions, cache)
    return cache, mask


def _path(node: int) -> list[int]:
    out = [node]
    while PARENTS[out[-1]] >= 0:
        out.append(PARENTS[out[-1]])
    return out[::-1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["fp32", "w4a8", "w8a8"])
def test_tree_node_logits_equal_linear_path_alone(arch, kind):
    model = build(arch, kind)
    prompts = [tokens(11, 1)[0], tokens(6, 2)[0]]  # row 1 left-padded by 5
    cache, mask = _prefilled(model, prompts)
    nodes = torch.stack([tokens(len(PARENTS), 3)[0], tokens(len(PARENTS), 4)[0]])
    depth, ancestors = tree_paths(torch.tensor([PARENTS] * 2))
    tree_mask = torch.cat([mask.bool()[:, None, :].expand(-1, len(PARENTS), -1), ancestors], -1)[:, None]
    positions = mask.sum(-1, keepdim=True) + depth
    got = _forward(model, nodes, tree_mask, positions, cache)
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0, report["fallbacks"]
    for row, prompt in enumerate(prompts):
        for node in range(len(PARENTS)):
            path = _path(node)
            alone, _ = _prefilled(model, [prompt])
            n = len(prompt)
            want = _forward(model, nodes[row, path][None], None, torch.arange(n, n + len(path))[None], alone)
            assert torch.equal(got[row, node], want[0, -1]), (row, node)


def test_tree_then_linear_steps_continue_exactly():
    """After a tree forward the accepted path's keys and values, moved to the first new slots, are
    the bits a linear feed writes: the next step's logits equal plain decoding's."""
    model = build("llama", "w4a8")
    prompt = tokens(9, 5)[0]
    nodes = tokens(len(PARENTS), 6)
    cache, mask = _prefilled(model, [prompt])
    depth, ancestors = tree_paths(torch.tensor([PARENTS]))
    tree_mask = torch.cat([mask.bool()[:, None, :].expand(-1, len(PARENTS), -1), ancestors], -1)[:, None]
    _forward(model, nodes, tree_mask, len(prompt) + depth, cache)
    path = _path(7)  # depth 3
    for layer in cache.layers:
        for buf in (layer.keys, layer.values):
            new = buf[:, :, len(prompt):]
            new[:, :, : len(path)] = new[:, :, path].clone()
    cache.crop(-(len(PARENTS) - len(path)))
    nxt = tokens(1, 7)
    got = _forward(model, nxt, None, torch.tensor([[len(prompt) + len(path)]]), cache)
    plain, _ = _prefilled(model, [torch.cat([prompt, nodes[0, path]])])
    want = _forward(model, nxt, None, torch.tensor([[len(prompt) + len(path)]]), plain)
    assert torch.equal(got, want)


def test_masks_that_are_not_trees_take_the_module_path():
    model = build("llama", "fp32")
    prompt = tokens(8, 1)[0]
    nodes = tokens(4, 2)
    for bad in ("sibling", "hole"):
        cache, mask = _prefilled(model, [prompt])
        _, ancestors = tree_paths(torch.tensor([[-1, 0, 0, 1]]))
        past = mask.bool()[:, None, :].expand(-1, 4, -1).clone()
        if bad == "sibling":
            ancestors[0, 3, 2] = True  # slot 3 also sees slot 2, which is not its ancestor
        else:
            past[0, :, 3] = False  # a hole inside the row's cache
        tree_mask = torch.cat([past, ancestors], -1)[:, None]
        before = engine_runtime(model).counts["engine"]
        _forward(model, nodes, tree_mask, torch.tensor([[8, 9, 9, 10]]), cache)
        assert engine_runtime(model).counts["engine"] == before
        assert "not a token tree" in engine_runtime(model).last


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lookahead_on_a_quantized_target_is_token_identical(kind, batch):
    """Lookahead's trees, verified on the engine, give plain decoding's tokens on a quantized target
    (where a rounding difference in attention would flip int8 codes and change them)."""
    from test_engine_speculative import QUANT, _rows, left_padded

    plain = build("llama", kind)
    spec = build("llama", "fp32", engine=False)
    ix.restore(spec)
    ix.optimize(spec, QUANT[kind], "lookahead(adaptive=false, max_nodes=12, depth=6)", "engine")
    rows = _rows()[:batch]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        want = plain.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, pad_token_id=0)
        outs = [spec.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, pad_token_id=0)
                for _ in range(2)]  # the second call drafts from the first's output: long paths
    assert all(torch.equal(want, o) for o in outs)
    report = engine_runtime(spec).report()
    assert report["module_forwards"] == 0, report["fallbacks"]
    stats = ix.speculative.speculative_stats(spec)
    assert stats.tree_path == "token trees" and stats.last.accepted > stats.last.steps


def test_tree_rows_retiring_on_eos_stay_token_identical():
    """Rows that stop at different steps (eos) leave the engine's cache between tree forwards; the
    others keep decoding exactly as plain ``generate``."""
    from test_engine_speculative import _rows, left_padded

    plain = build("llama", "w4a8")
    ids, mask = left_padded(_rows())
    with torch.no_grad():
        free = plain.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 4])  # row 0's fifth new token ends it (other rows may stop too)
    spec = build("llama", "fp32", engine=False)
    ix.restore(spec)
    ix.optimize(spec, "w4a8", "lookahead(adaptive=false, max_nodes=12, depth=6)", "engine")
    with torch.no_grad():
        want = plain.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0,
                              eos_token_id=eos)
        outs = [spec.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0,
                              eos_token_id=eos) for _ in range(2)]
    assert all(torch.equal(want, o) for o in outs)
    assert engine_runtime(spec).report()["module_forwards"] == 0
    assert ix.speculative.speculative_stats(spec).tree_path == "token trees"


def test_whole_layer_loop_equals_the_general_loop():
    """The plain-decode loop (``Runner._whole_layers``) and the general one give the same bits, with
    and without a tree (an ``EngineCache`` subclass takes the general loop)."""

    class Other(EngineCache):
        pass

    model = build("qwen3", "w4a8")
    prompt = tokens(10, 8)
    nodes = tokens(len(PARENTS), 9)
    depth, ancestors = tree_paths(torch.tensor([PARENTS]))
    got = []
    for cls in (EngineCache, Other):
        cache = cls(model.config)
        with torch.no_grad():
            first = model(input_ids=prompt, cache=cache, use_cache=True).logits
        mask = torch.ones(1, 10, dtype=torch.long)
        tree_mask = torch.cat([mask.bool()[:, None, :].expand(-1, len(PARENTS), -1), ancestors], -1)[:, None]
        got.append((first, _forward(model, nodes, tree_mask, 10 + depth, cache)))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
