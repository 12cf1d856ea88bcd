"""accelerate device maps with layers on cpu and disk: cache and decoding transforms act on the
dispatched model as they do on one device; quantization comes first (optimize, then
dispatch_model), and a dispatched model whose weights sit on the meta device is refused with that
order named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

import infertrix as ix
from infertrix.core.transform import UnsupportedModelError

pytest.importorskip("accelerate")

MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk",
       "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _greedy(model, ids: torch.Tensor) -> list[int]:
    return model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()


def test_cache_and_decoding_on_a_cpu_and_disk_map(tmp_path: Path) -> None:
    make_tiny("llama", initializer_range=0.2).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=MAP, offload_folder=tmp_path / "off")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for recipe in ["snapkv:0.5", "pld"]:
        want = _greedy(ix.optimize(one, recipe), ids)
        assert _greedy(ix.optimize(model, recipe), ids) == want, recipe
        ix.restore(model)
        ix.restore(one)
    with pytest.raises(UnsupportedModelError, match="dispatch_model"):
        ix.optimize(model, "w8a8(smooth_alpha=none)")


def test_optimize_then_dispatch(tmp_path: Path) -> None:
    from accelerate import dispatch_model

    model = make_tiny("llama", initializer_range=0.2)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    ix.optimize(model, "w4a8", "snapkv:0.5")
    want = _greedy(model, ids)
    dispatch_model(model, MAP, offload_dir=tmp_path / "off")
    assert _greedy(model, ids) == want
