"""One calibration data path: every family calibrates on the windows core.calibration cuts, and
honours the user's text or token ids."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, make_tiny

import infertrix as ix
import infertrix.eval as ixe
from infertrix.core import ConfigError
from infertrix.core.calibration import body_text, token_windows
from infertrix.moe.upcycle import upcycle
from infertrix.quant import W8A8
from infertrix.skip import ShortGPT

TEXT = body_text()[:4000]
SETTINGS = dict(calibration_windows=3, window_tokens=32)


def byte_model():
    return make_tiny("llama", vocab_size=259)


def fed(model, run) -> torch.Tensor:
    """The input_ids of every forward pass of ``model`` during ``run()``, one row each."""
    rows = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(kw["input_ids"][0].cpu()),
                                             with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return torch.stack(rows)


def families(tok, **calib):
    """(name, run(model)) for each family's calibration on ``model`` with the same settings."""
    return {
        "quant": lambda m: ix.optimize(m, W8A8(tokenizer=tok, progress=False, **calib)),
        "skip": lambda m: ShortGPT(count=1, tokenizer=tok, progress=False, **calib).plan(m),
    }


def test_every_family_calibrates_on_the_same_windows_of_a_users_text():
    tok = byte_tokenizer()
    want = token_windows(tok, TEXT, windows=3, window_tokens=32)
    assert want.shape == (3, 32)
    assert torch.equal(want[0], torch.tensor(tok(TEXT[:32], add_special_tokens=False)["input_ids"]))
    for name, run in families(tok, calibration_text=TEXT, **SETTINGS).items():
        model = byte_model()
        assert torch.equal(fed(model, lambda run=run, model=model: run(model)), want), name
    dense = byte_model()
    assert torch.equal(fed(dense, lambda: upcycle(dense, num_experts=4, calibration_ids=want)), want)
    assert torch.equal(ixe.token_windows(tok, TEXT, max_tokens=96, window=32), want)


def test_every_family_honours_token_ids():
    ids = torch.randint(3, 128, (100,), generator=torch.Generator().manual_seed(0))
    want = ids[:96].view(3, 32)  # 1-D ids: whole windows of window_tokens
    for name, run in families(None, calibration_ids=ids, **SETTINGS).items():
        model = make_tiny("llama")
        assert torch.equal(fed(model, lambda run=run, model=model: run(model)), want), name
    dense = make_tiny("llama")
    assert torch.equal(fed(dense, lambda: upcycle(dense, num_experts=4, calibration_ids=ids, window_tokens=32)), want)
    rows = [want[i : i + 1] for i in range(3)]  # a list of [1, L] rows, or [n, L]: windows as they are
    assert torch.equal(token_windows(ids=rows, window_tokens=8), want)
    assert torch.equal(token_windows(ids=want, window_tokens=8), want)
    assert torch.equal(token_windows(ids=ids[:20], window_tokens=32), ids[:20].unsqueeze(0))
    with pytest.raises(ConfigError, match="different lengths"):
        token_windows(ids=[ids[:5], ids[:6]])


def test_the_shipped_text_is_the_default():
    tok = byte_tokenizer()
    model = byte_model()
    got = fed(model, lambda: ix.optimize(model, W8A8(tokenizer=tok, progress=False, **SETTINGS)))
    assert torch.equal(got, token_windows(tok, windows=3, window_tokens=32))  # quant: the end of the book
    model = byte_model()
    got = fed(model, lambda: ShortGPT(count=1, tokenizer=tok, progress=False, **SETTINGS).plan(model))
    assert torch.equal(got, token_windows(tok, windows=3, window_tokens=32, start=0.5))  # skip: its middle


@pytest.mark.parametrize(("recipe", "new"), [
    ("w8a8(num_samples=2)", "calibration_windows"), ("w4a8(seq_len=64)", "window_tokens"),
    ("w8a8(calibration_data=1)", "calibration_ids"), ("shortgpt(calibration_tokens=256)", "calibration_windows"),
    ("attn_drop(window=64)", "window_tokens"),
])
def test_old_calibration_field_names_name_the_new_one(recipe, new):
    with pytest.raises(ConfigError, match=f"renamed: use '{new}'"):
        ix.parse_recipe(recipe)
