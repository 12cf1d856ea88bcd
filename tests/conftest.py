"""Shared fixtures: tiny randomly initialised models of each architecture we claim, and SmolLM2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infertrix.quant.transform import QuantTransform

torch.set_num_threads(2)

TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def make_tiny(arch: str, seed: int = 0, **overrides):
    """A tiny randomly initialised causal LM of the given architecture, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(TINY_COMMON, **overrides)
    if arch == "llama":
        cfg = tf.LlamaConfig(**kw)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**kw)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**kw, sliding_window=None)
        cls = tf.MistralForCausalLM
    elif arch == "gemma3":
        kw.setdefault("head_dim", 16)
        n = kw["num_hidden_layers"]
        kw.setdefault("layer_types", ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2))
        cfg = tf.Gemma3TextConfig(**kw, sliding_window=8)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).eval()
    return model


class FloatCopy(QuantTransform):
    """A quant transform whose "quantizer" copies the (smoothed / rotated) weight into a float
    nn.Linear: what the shared calibration machinery does to the float function, alone."""

    def quantize_linear(self, linear, weight, hessian):
        new = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight.data.copy_(weight)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias)
        return new


ARCHS = ["llama", "qwen2", "mistral", "gemma3"]

# windows small enough for the tiny models' short prompts, set on every method that has the field
SMALL_WINDOWS = {"sink_tokens": 2, "window_size": 4, "kernel_size": 3, "beta": 4, "lag_size": 4}


def small(cls, **kw):
    """``cls`` configured with :data:`SMALL_WINDOWS` where it has those fields, plus ``kw``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in SMALL_WINDOWS.items() if k in names}, **kw)


def kv_policies(**kw) -> list:
    """One configured instance of every registered KV eviction policy (the registry is the list)."""
    import infertrix as ix
    from infertrix.kvcache import KVPolicy

    return [small(cls, **kw) for cls in ix.available("kvcache").values() if issubclass(cls, KVPolicy)]


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (skipped with the install command when it is absent)."""
    from infertrix import models

    try:
        models.smollm2_gguf_path()
    except models.ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    return models.load("smollm2")


def byte_tokenizer():
    """A real (fast) tokenizer with a 256-symbol byte-level vocabulary and no merges, so tiny
    models can be driven by the same code paths as real ones (use vocab_size >= 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """A tiny Llama saved with the byte tokenizer: loaded from here, a model finds its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    make_tiny("llama", vocab_size=259).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


CPU_ISAS = ["scalar", "avx2", "avx512_vnni"]


def available_isas() -> list[str]:
    """Every ISA the compiled extension can run here (none when it is not built)."""
    from infertrix import ops

    if ops.status().cpu_isa is None:
        return []
    import infertrix._C as C

    return CPU_ISAS[: CPU_ISAS.index(C.detected_cpu_isa()) + 1]


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Run the test once per CPU code path, forcing the kernels onto it (skipped if unavailable)."""
    from infertrix import ops

    if request.param not in available_isas():
        pytest.skip(f"{request.param} not available (extension missing or CPU lacks it)")
    ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa("auto")


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``rows`` ([1, n] each) left-padded with 0 to the longest."""
    width = max(r.shape[1] for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    return batch, mask


def assert_rows_decode_as_alone(model, batch, mask, rows, new_tokens: int) -> None:
    """Greedy ``generate`` of the padded ``batch``: every row's tokens equal, and its logits match, the
    row run alone (the project's batch invariance)."""

    def greedy(ids, **kw):
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kw)
        return out.sequences, torch.stack(out.logits, 1)

    seq, logits = greedy(batch, attention_mask=mask)
    for i, r in enumerate(rows):
        alone_seq, alone_logits = greedy(r)
        assert torch.equal(seq[i, batch.shape[1] :], alone_seq[0, r.shape[1] :]), f"row {i}"
        torch.testing.assert_close(logits[i], alone_logits[0], atol=2e-4, rtol=1e-4, msg=f"row {i}")
