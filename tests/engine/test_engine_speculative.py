"""Speculative decoding on the engine: greedy output token-identical to plain decoding of the same
quantized target, every batch row identical to its single-row run, verification and drafts on the
engine at any batch size (no module-path fallback), at 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch
from test_engine import ARCHS, _generate, build, tokens

import infertrix as ix
from infertrix.engine import engine_runtime
from infertrix.speculative import speculative_stats

QUANT = {"w4a8": "w4a8", "w8a8": "w8a8(smooth_alpha=none)"}
CASES = [("w4a8", "pld"), ("w8a8", "pld"), ("w4a8", "quantized_self(adaptive=false)")]


def speculative(arch: str, kind: str, spec: str):
    model = build(arch, "fp32", engine=False)  # float weights: quantized_self's draft is built from them
    ix.restore(model)
    return ix.optimize(model, QUANT[kind], spec, "engine")


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def _rows() -> list[torch.Tensor]:
    return [torch.cat([tokens(10, 3)] * 2, 1)[0], torch.cat([tokens(7, 5)] * 3, 1)[0], tokens(4, 6)[0]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kind", "spec"), CASES)
def test_batch_rows_equal_single_plain_rows(arch, kind, spec):
    """Rows keep different numbers of drafts each step, yet verification stays on the engine and
    every row decodes exactly like the same prompt alone without speculation."""
    plain, model = build(arch, kind), speculative(arch, kind, spec)
    rows = _rows()
    ids, mask = left_padded(rows)
    got = _generate(model, ids, mask, n=30)
    for i, r in enumerate(rows):
        alone = _generate(plain, r[None], n=30)[0, len(r) :]  # shorter when the row ends with EOS
        assert torch.equal(got[i, ids.shape[1] : ids.shape[1] + len(alone)], alone), i
        assert not got[i, ids.shape[1] + len(alone) :].any(), i  # padding after it
    report = engine_runtime(model).report()
    assert report["module_forwards"] == 0, report["fallbacks"]
    stats = speculative_stats(model).report()
    assert stats["verify rows"].startswith("aligned")
    assert stats["last call"]["steps"] < 30 * 3  # rows advanced together
    if "quantized_self" in spec:
        assert stats["draft path"] == "engine, on the model's KV cache"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_quantized_self_is_token_identical_at_one_and_two_threads(arch):
    ids = torch.cat([tokens(9, 7)] * 2, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _generate(build(arch, "w4a8"), ids, n=32)
        torch.set_num_threads(2)
        model = speculative(arch, "w4a8", "quantized_self")
        assert torch.equal(_generate(model, ids, n=32), want)
    finally:
        torch.set_num_threads(threads)
    assert engine_runtime(model).report()["module_forwards"] == 0
    assert speculative_stats(model).report()["draft path"] == "engine, on the model's KV cache"


def test_rows_retire_and_the_rest_stay_identical():
    """An eos ends one row early: it leaves the engine's cache and the others keep decoding exactly."""
    plain, model = build("qwen2", "w4a8"), speculative("qwen2", "w4a8", "pld")
    rows = _rows()
    ids, mask = left_padded(rows)
    alone = [_generate(plain, r[None], n=20)[0, len(r) :] for r in rows]
    eos = int(alone[2][3])  # row 2's fourth token ends it
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        want = plain.generate(input_ids=r[None], attention_mask=torch.ones_like(r[None]), **kw)[0, len(r) :]
        assert torch.equal(got[i, ids.shape[1] : ids.shape[1] + len(want)], want), i
    assert engine_runtime(model).report()["module_forwards"] == 0
