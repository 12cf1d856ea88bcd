"""transformers' tensor parallelism (tp_plan="auto") on CPU: two gloo ranks under torchrun give the
single-process model's greedy tokens with each supported family applied, and the rest is refused
with its reason before anything changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

import infertrix as ix
from infertrix.core import parallel
from infertrix.core.api import applied_transforms
from infertrix.core.parallel import TensorParallel
from infertrix.core.transform import UnsupportedModelError

RECIPES = [
    "w8a8(smooth_alpha=none)",
    "w4a8,snapkv:0.5,pld(adaptive=false)",  # group 32 (whole groups on each rank), int4 head gathered
    "w4a8(group_size=-1,symmetric=true,quantize_lm_head=false),uniform_skip:0.25,kivi",
    "streaming_llm:0.5,draft_model",
]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    # intermediate 128: 64 input features of down_proj per rank, whole groups of 32
    make_tiny("llama", intermediate_size=128, initializer_range=0.2).save_pretrained(tmp_path / "model")
    make_tiny("llama", seed=5, num_hidden_layers=1, initializer_range=0.2).save_pretrained(tmp_path / "draft")
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    worker = Path(__file__).with_name("tp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(tmp_path / "model"), str(tmp_path / "draft"), str(out), *RECIPES]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == RECIPES
    for recipe, r in results.items():
        assert r["ranks"][0] == r["ranks"][1] == r["want"], recipe
        assert r["max_logit_diff"] < 1e-4, recipe


@pytest.fixture
def sharded(monkeypatch: pytest.MonkeyPatch):
    """A single-process tiny Llama that optimize sees as sharded over two ranks (refusals are
    decided before any collective runs)."""
    model = make_tiny("llama")
    plan = {f"model.layers.*.{p}": s for p, s in [("self_attn.q_proj", "colwise"), ("self_attn.o_proj", "rowwise"),
                                                  ("mlp.up_proj", "colwise"), ("mlp.down_proj", "rowwise")]}
    monkeypatch.setattr(parallel, "tensor_parallel", lambda m: TensorParallel(None, 0, 2, plan))
    return model


@pytest.mark.parametrize("recipe, reason", [
    ("engine", "fused op over whole weights"),
    ("w4a16", "int4pack"),
    ("w8a8", "calibration (SmoothQuant smooth_alpha=0.5) reads whole layer inputs"),
    ("w4a8(gptq=true)", "quantize without data: recipe 'w4a8(gptq=false)'"),
    ("w4a8(rotate=true)", "rotation"),
    ("w4a8(outlier_fraction=0.005)", "outlier_fraction=0"),
    ("w4a8(group_size=48)", "not on a boundary of group_size=48"),
    ("quantized_self", "bound to the original modules"),
    ("skinny", "load the model without tp_plan"),
    ("self_speculative", "measured times"),
    ("pld", "give adaptive=false, e.g. pld(adaptive=false)"),
    ("lookahead", "differ between ranks"),
])
def test_refused_under_tensor_parallelism_with_the_reason(sharded, recipe: str, reason: str) -> None:
    before = {k: v.clone() for k, v in sharded.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="tensor parallelism") as err:
        ix.optimize(sharded, recipe)
    assert reason in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in sharded.state_dict().items())
    assert applied_transforms(sharded) == []
