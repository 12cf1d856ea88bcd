"""QuantizedLinear: kinds register themselves, a new kind saves and loads with no list edited, the
shared contract (spec, kernel buffers, fuse) holds for every kind, and quant/ has no import cycle."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

import infertrix as ix
from infertrix.quant import QuantizedLinear, QuantTransform, W4A8Linear, W4A16Linear, W8A8Linear
from infertrix.quant.int4 import quantize_int4


class RowInt8Linear(QuantizedLinear, kind="_test_row_int8"):
    """A throwaway kind: int8 codes with one float scale per output row, computed in float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 clip: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias, dtype)
        self.clip = clip
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features))

    def extra_spec(self) -> dict:
        return {"clip": self.clip}

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.qweight.float() * self.scale[:, None], self.bias).to(x.dtype)


@ix.register_transform("_test_row_int8")
@dataclass
class RowInt8(QuantTransform):
    clip: float = 0.9

    def quantize_linear(self, linear: nn.Linear, weight: Tensor, hessian: Tensor | None) -> QuantizedLinear:
        mod = RowInt8Linear(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                            clip=self.clip)
        mod.scale.copy_(weight.abs().amax(1).clamp_min(1e-8) * self.clip / 127)
        mod.qweight.copy_(torch.round(weight / mod.scale[:, None]).clamp(-127, 127).to(torch.int8))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod


def test_a_kind_defined_here_registers_and_round_trips_through_a_checkpoint(tmp_path):
    assert QuantizedLinear.kinds()["_test_row_int8"] is RowInt8Linear
    model = make_tiny("qwen2")  # q/k/v with a bias
    ix.optimize(model, RowInt8(clip=0.8))
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    specs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant"]["modules"]
    assert {s["type"] for s in specs.values()} == {"_test_row_int8"}
    assert {s["clip"] for s in specs.values()} == {0.8}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    kinds = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert kinds == {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(kinds.values()) == {RowInt8Linear} and loaded.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)
    desc = ix.describe(loaded).transforms
    assert [t["name"] for t in desc] == ["_test_row_int8", "engine"]  # optimize's default, as on the saved model
    out = loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                           do_sample=False))
    engine = ix.describe(loaded).transforms[1]["report"]
    assert engine["engine_forwards"] == 0 and "RowInt8Linear" in engine["model"]  # a kind it lacks: module path, said


def test_a_kind_is_named_once():
    with pytest.raises(TypeError, match="must name its kind"):
        class Unnamed(QuantizedLinear):  # noqa: F841
            pass
    with pytest.raises(TypeError, match="'w4a8' is already infertrix.quant.w4a8_linear.W4A8Linear"):
        class Impostor(QuantizedLinear, kind="w4a8"):  # noqa: F841
            pass
    assert QuantizedLinear.kinds()["w4a8"] is W4A8Linear


def test_checkpoints_that_recorded_class_names_still_resolve():
    assert QuantizedLinear.lookup("W8A8Linear") is W8A8Linear is QuantizedLinear.lookup("w8a8")
    assert QuantizedLinear.lookup("nope") is None


def _ours() -> list[QuantizedLinear]:
    lin = nn.Linear(64, 48, bias=True)
    w = quantize_int4(lin.weight, 32, symmetric=False)
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    return [
        W4A8Linear.from_linear(lin, 32),
        W8A8Linear.from_weight(q, torch.rand(48) / 100, lin.bias, torch.float32),
        W4A16Linear.from_int4(quantize_int4(lin.weight, 32, symmetric=False, two_level=False), lin.bias,
                              torch.float32),
        W4A8Linear.from_int4(w, lin.bias, outliers=(torch.tensor([1, 5]), torch.tensor([2, 60]), torch.rand(2))),
    ]


@pytest.mark.parametrize("index", range(4), ids=["w4a8", "w8a8", "w4a16", "w4a8_outliers"])
def test_every_kind_keeps_the_contract(index):
    mod = _ours()[index]
    assert QuantizedLinear.kinds()[mod.kind] is type(mod) and mod.kernel
    assert not list(mod.parameters())  # all state in buffers
    # kernel_buffers are the module's own tensors, no copies; None where a buffer is unused
    bufs = mod.kernel_buffers()
    assert {n: t.data_ptr() for n, t in bufs.items() if t is not None} == {
        n: t.data_ptr() for n, t in mod.named_buffers()}
    assert mod.storage_bytes() == sum(t.numel() * t.element_size() for t in bufs.values() if t is not None)
    # spec -> from_spec gives the empty module of the same shape; the state dict fills it
    spec = json.loads(json.dumps(mod.spec()))
    assert spec["type"] == mod.kind
    empty = QuantizedLinear.lookup(spec["type"]).from_spec(spec)
    assert empty.spec() == mod.spec()
    empty.load_state_dict(mod.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(empty(x), mod(x))


def test_fuse_is_asked_of_the_kind():
    w4, w8, w16, w4_outliers = _ours()
    b4 = W4A8Linear.from_linear(nn.Linear(64, 32, bias=True), 32)
    x = torch.randn(2, 64)
    refs = [w4(x), b4(x)]
    fused = W4A8Linear.fuse([w4, b4])
    assert fused is not None and torch.equal(fused(x), torch.cat(refs, -1))
    assert w4.qweight.data_ptr() == fused.qweight.data_ptr()  # the originals view the fused codes
    assert W4A16Linear.fuse([w16, w16]) is None  # a kind that cannot fuse
    assert W4A8Linear.fuse([w4, w4_outliers]) is None  # sparse outliers do not fuse
    assert W8A8Linear.fuse([w8, w4]) is None  # mixed kinds


def test_quant_has_no_import_cycle():
    """Every import inside infertrix/quant, at module level or in a function, forms no cycle."""
    root = Path(ix.quant.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                graph[name].update(t.split(".")[0] for t in targets if (root / f"{t.split('.')[0]}.py").exists())
    graph.pop("__init__")

    def in_a_cycle(start: str) -> bool:
        todo, seen = list(graph[start]), set()
        while todo:
            mod = todo.pop()
            if mod == start:
                return True
            if mod not in seen:
                seen.add(mod)
                todo.extend(graph.get(mod, ()))
        return False

    assert [m for m in graph if in_a_cycle(m)] == []


@pytest.mark.parametrize("recipe", ["w8a8(smooth_alpha=none)", "w4a8", "w4a16"])
def test_casting_a_quantized_model_keeps_its_scales(recipe):
    """``model.to(torch.bfloat16)`` after quantizing: the kernels still get the scales they read
    (a cast to bfloat16 had made them refuse, 'scale must be float32'), the layers compute in
    bfloat16, and their codes and scales come back from a round trip to bfloat16 bit for bit."""
    model = make_tiny("llama")
    ix.optimize(model, recipe)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    dtypes = {id(m): {n: b.dtype for n, b in m.named_buffers(recurse=False) if n != "bias"} for m in layers}
    saved = {id(m): {n: b.clone() for n, b in m.named_buffers(recurse=False) if n != "bias"} for m in layers}
    model.to(torch.bfloat16)
    for m in layers:
        assert m.dtype == torch.bfloat16
        assert {n: b.dtype for n, b in m.named_buffers(recurse=False) if n != "bias"} == dtypes[id(m)]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 16
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    model.to(torch.float32)
    for m in layers:
        assert m.dtype == torch.float32
        assert all(torch.equal(b, saved[id(m)][n]) for n, b in m.named_buffers(recurse=False) if n != "bias")
    with torch.no_grad():  # the float layers (embeddings, norms) went through bfloat16: close, not equal
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0.1)
