"""ExpertStore: written from a model or a checkpoint, read back exactly, pages dropped."""

from __future__ import annotations

import os

import pytest
import torch
from moe_models import make_moe

from infertrix.core import ConfigError, UnsupportedModelError
from infertrix.moe import ExpertStore, find_moe_layers
from infertrix.moe.expert_files import ALIGN, aligned_empty


def _experts(model):
    return {x.index: (x.experts.gate_up_proj.detach(), x.experts.down_proj.detach()) for x in find_moe_layers(model)}


def _assert_store_equals(store, experts):
    assert store.layers == sorted(experts)
    for i, (gu, dn) in experts.items():
        for j in range(gu.shape[0]):
            a, b = torch.empty_like(gu[j]), torch.empty_like(dn[j])
            n = store.read_into(i, j, a, b)
            assert torch.equal(a, gu[j]) and torch.equal(b, dn[j])
            assert n == (a.nbytes + b.nbytes if store.tier == "disk" else 0)
            va, vb = store.view(i, j)
            assert torch.equal(va, gu[j]) and torch.equal(vb, dn[j])
            store.release(i, j)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_from_model_round_trip_and_safetensors_compatible(arch, tmp_path):
    from safetensors import safe_open

    model = make_moe(arch)
    experts = _experts(model)
    store = ExpertStore.from_model(model, tmp_path / "s")
    _assert_store_equals(store, experts)
    with safe_open(str(tmp_path / "s" / "layer_001.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("e0003.gate_up"), experts[1][0][3])
        assert torch.equal(f.get_tensor("e0003.down"), experts[1][1][3])
    gu, dn = store.load_layer(2)
    assert torch.equal(gu, experts[2][0]) and torch.equal(dn, experts[2][1])
    store.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_from_checkpoint_matches_model(arch, tmp_path):
    model = make_moe(arch)
    model.save_pretrained(tmp_path / "ckpt")
    store = ExpertStore.from_checkpoint(tmp_path / "ckpt", tmp_path / "s")
    _assert_store_equals(store, _experts(model))


def test_host_tier_matches_disk(tmp_path):
    model = make_moe("qwen2_moe")
    ExpertStore.from_model(model, tmp_path / "s").close()
    store = ExpertStore.open(tmp_path / "s", tier="host")
    _assert_store_equals(store, _experts(model))


def _misaligned(shape):
    """A contiguous float tensor whose data is not page-aligned (forces the page-cache path)."""
    n = 1
    for d in shape:
        n *= d
    base = aligned_empty((n + 16,), torch.float32)
    return base[16:].view(shape)


def test_reads_drop_page_cache(tmp_path, monkeypatch):
    model = make_moe("mixtral")
    experts = _experts(model)
    store = ExpertStore.from_model(model, tmp_path / "s")
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n, adv)) or real(fd, off, n, adv))
    a, b = _misaligned(store.gate_up_shape), _misaligned(store.down_shape)
    store.read_into(0, 5, a, b)
    assert torch.equal(a, experts[0][0][5]) and torch.equal(b, experts[0][1][5])
    assert calls == [(store._files[0].entries[5].offset, store.expert_bytes, os.POSIX_FADV_DONTNEED)]


def test_aligned_reads_bypass_page_cache(tmp_path, monkeypatch):
    """Expert data is page-aligned in the file; into page-aligned slots it is read with O_DIRECT."""
    import fcntl

    model = make_moe("mixtral")
    experts = _experts(model)
    store = ExpertStore.from_model(model, tmp_path / "s")
    lf = store._files[1]
    assert all(e.offset % ALIGN == 0 for e in lf.entries.values())
    if lf.direct_fd < 0:
        pytest.skip("this file system refuses O_DIRECT")
    assert fcntl.fcntl(lf.direct_fd, fcntl.F_GETFL) & os.O_DIRECT
    fds, advised = [], []
    real_read, real_advise = os.preadv, os.posix_fadvise
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: fds.append(fd) or real_read(fd, bufs, off))
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a) or real_advise(*a))
    a, b = aligned_empty(store.gate_up_shape, torch.float32), aligned_empty(store.down_shape, torch.float32)
    assert a.data_ptr() % ALIGN == 0 and b.data_ptr() % ALIGN == 0
    assert store.read_into(1, 6, a, b) == store.expert_bytes
    assert torch.equal(a, experts[1][0][6]) and torch.equal(b, experts[1][1][6])
    assert fds == [lf.direct_fd] and advised == []  # one read, straight from the disk, no page cache


def test_errors(tmp_path):
    from conftest import make_tiny

    with pytest.raises(ConfigError, match="is not an expert store"):
        ExpertStore.open(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no Mixture-of-Experts layers"):
        ExpertStore.from_model(make_tiny("llama"), tmp_path / "x")
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="no MoE expert weights"):
        ExpertStore.from_checkpoint(tmp_path / "dense", tmp_path / "y")
    with pytest.raises(ConfigError, match="tier must be"):
        ExpertStore(tmp_path, tier="ssd")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_load_offloaded_from_checkpoint_is_exact(arch, tmp_path):
    import infertrix as ix
    from infertrix.moe import ExpertOffload, load_offloaded

    model = make_moe(arch)
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77]])
    with torch.no_grad():
        ref = model(ids).logits
    ref_gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    off = load_offloaded(tmp_path / "ckpt", ExpertOffload(budget=0.25, store_dir=str(tmp_path / "store")))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref, atol=1e-5, rtol=0)
    assert torch.equal(off.generate(ids, max_new_tokens=8, do_sample=False), ref_gen)
    assert not any(t.device.type == "meta" for t in off.state_dict().values())
    ix.restore(off)  # the experts come back from the store, on the CPU
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref, atol=1e-5, rtol=0)


def test_load_offloaded_keeps_a_separate_lm_head_of_a_tied_config(tmp_path):
    """A checkpoint whose config says tie_word_embeddings but which holds its own lm_head loads as
    transformers loads it (untied), so the offloaded model's logits equal from_pretrained's."""
    from transformers import AutoModelForCausalLM

    from infertrix.moe import ExpertOffload, load_offloaded

    model = make_moe("mixtral")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    model.save_pretrained(tmp_path / "ckpt")
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not torch.equal(ref_model.lm_head.weight, ref_model.get_input_embeddings().weight)
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 41, 77]])
    with torch.no_grad():
        ref = ref_model(ids).logits
        off = load_offloaded(tmp_path / "ckpt", ExpertOffload(budget=0.25, store_dir=str(tmp_path / "store")))
        torch.testing.assert_close(off(ids).logits, ref, atol=1e-5, rtol=0)
