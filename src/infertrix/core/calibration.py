"""Calibration data for every family: the shipped text, the model's tokenizer, token windows.

Families that calibrate (quant's SmoothQuant and GPTQ, skip's similarity strategies, moe's
upcycling router) read their data through :func:`windows_for` and run it with
:func:`run_windows`, so they share one tokenizer lookup, one text and one shape of data: a
``[n, window_tokens]`` tensor of token ids, each row one independent forward pass.

The calibration fields, with the same names in every family's config:
  tokenizer: tokenizes the calibration text (default: the model's own, see :func:`find_tokenizer`).
  calibration_text: a text or list of texts to calibrate on, read from the start (default: the
    shipped *Pride and Prejudice*, at a place each family chooses away from where the benchmarks
    measure perplexity).
  calibration_ids: token ids instead of text: a ``[n, L]`` tensor (or a list of equal-length
    rows) is taken as ``n`` windows as it is; 1-D ids are cut into windows of ``window_tokens``.
  calibration_windows: how many windows to cut from the text.
  window_tokens: tokens per window.
Old names are refused in recipes with the new one named (:data:`RENAMED_FIELDS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .transform import ConfigError

TEXTS = {"prideprejudice": "prideprejudice.txt"}

# the calibration fields' earlier names (they differed by family) -> (the name now, a note for the error)
RENAMED_FIELDS = {
    "calibration_data": ("calibration_ids", ""),
    "calibration_texts": ("calibration_text", ""),
    "num_samples": ("calibration_windows", ""),
    "seq_len": ("window_tokens", ""),
    "calibration_tokens": ("calibration_windows", ", a count of windows of window_tokens tokens"),
    "window": ("window_tokens", ""),
}

CHARS_PER_TOKEN = 8  # text read per wanted token: English prose is about 4 characters a token


def load_text(name: str = "prideprejudice") -> str:
    """The full text of a shipped public-domain book (Jane Austen's *Pride and Prejudice*)."""
    try:
        fname = TEXTS[name]
    except KeyError:
        raise ValueError(f"unknown text {name!r}; shipped texts: {sorted(TEXTS)}") from None
    return resources.files("infertrix.data").joinpath(fname).read_text(encoding="utf-8")


def body_text(name: str = "prideprejudice") -> str:
    """The text without its title lines, paragraphs joined by single blank lines."""
    text = load_text(name)
    start = text.find("Chapter 1")
    return text[start:] if start >= 0 else text


def find_tokenizer(model: nn.Module) -> tuple[Any | None, str]:
    """``(tokenizer, where it came from)``, or ``(None, why none was found)``: the one
    ``infertrix.models.load`` returned with the model, else the folder or hub id it was loaded
    from (``name_or_path``; a GGUF folder through its one ``.gguf`` file). A recipe string cannot
    pass a tokenizer, so this is how recipes calibrate."""
    from ..models import tokenizer_of

    tok = tokenizer_of(model)
    if tok is not None:
        return tok, "returned with the model by infertrix.models.load"
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None, "the model records no name_or_path to load its tokenizer from (built from a config?)"
    attempts: list[dict[str, str]] = [{}]
    folder = Path(str(path))
    if folder.is_dir():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:  # a GGUF folder: the tokenizer lives in the .gguf file
            attempts.append({"gguf_file": ggufs[0].name})
    failure = ""
    for kwargs in attempts:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), **kwargs), f"loaded from {path}"
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ImportError...: reported to the user
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None, f"no tokenizer loads from the model's name_or_path {str(path)!r} ({failure})"


def _cut_ids(ids: Any, window_tokens: int) -> Tensor:
    if isinstance(ids, list | tuple):
        rows = [torch.as_tensor(r).reshape(-1) for r in ids]
        if len({r.numel() for r in rows}) != 1:
            raise ConfigError(
                f"calibration_ids rows have different lengths {sorted({r.numel() for r in rows})}; pass one "
                f"[n, L] tensor, or 1-D ids to cut into windows of window_tokens={window_tokens}"
            )
        return torch.stack(rows).long()
    ids = torch.as_tensor(ids).long()
    if ids.dim() == 2:
        return ids
    ids = ids.reshape(-1)
    if ids.numel() == 0:
        raise ConfigError("calibration needs at least one token; calibration_ids is empty")
    if ids.numel() < window_tokens:  # fewer ids than a window: they are the one window
        return ids.unsqueeze(0)
    n = ids.numel() // window_tokens
    return ids[: n * window_tokens].view(n, window_tokens)


def _text_ids(tokenizer: Any, texts: Sequence[str], need: int, start: float | None) -> Tensor:
    span = need * CHARS_PER_TOKEN
    if start is None:  # the last tokens of the (one shipped) text
        ids = tokenizer(texts[0][-span:], add_special_tokens=False)["input_ids"]
        return torch.as_tensor(ids[-need:], dtype=torch.long)
    chunks = []
    for text in texts:
        begin = int(len(text) * start)
        chunks.append(torch.as_tensor(tokenizer(text[begin : begin + span], add_special_tokens=False)["input_ids"],
                                      dtype=torch.long).reshape(-1))
    return torch.cat(chunks)[:need]


def token_windows(
    tokenizer: Any = None,
    text: str | Sequence[str] | None = None,
    ids: Any = None,
    windows: int = 8,
    window_tokens: int = 256,
    start: float | None = None,
) -> Tensor:
    """``[n, window_tokens]`` token ids: ``ids`` as given (see the module docstring), else up to
    ``windows`` windows of ``text`` read from its start, else of the shipped text from fraction
    ``start`` of it (None: its last tokens). Fewer windows when the text is short; an error when
    it has less than one."""
    if windows < 1 or window_tokens < 1:
        raise ConfigError(f"need calibration_windows >= 1 and window_tokens >= 1, got {windows} and {window_tokens}")
    if ids is not None:
        return _cut_ids(ids, window_tokens)
    if tokenizer is None:
        raise ConfigError("calibration text needs a tokenizer: pass tokenizer=..., or calibration_ids= token ids")
    if start is not None and not 0 <= start < 1:
        raise ConfigError(f"calibration start must be in [0, 1) (None: the end of the text), got {start}")
    if text is None:
        texts, where = [load_text()], start
    else:
        texts, where = ([text] if isinstance(text, str) else list(text)), 0.0
    need = windows * window_tokens
    got = _text_ids(tokenizer, texts, need, where)
    n = got.numel() // window_tokens
    if n == 0:
        raise ConfigError(f"text has {got.numel()} tokens, fewer than one window of {window_tokens} "
                          "(window_tokens); pass more text or lower window_tokens")
    return got[: n * window_tokens].view(n, window_tokens)


def windows_for(model: nn.Module, config: Any, start: float | None, otherwise: str = "", detail: str = "") -> Tensor:
    """The windows ``config`` calibrates ``model`` on, from its calibration fields (the names in
    the module docstring); ``start`` is where in the shipped text its family reads. Without a
    tokenizer, a ConfigError naming the fixes (``otherwise``: a family's way to need no data)."""
    tokenizer = None if config.calibration_ids is not None else require_tokenizer(model, config, otherwise, detail)
    return token_windows(tokenizer, config.calibration_text, config.calibration_ids, config.calibration_windows,
                         config.window_tokens, start)


def require_tokenizer(model: nn.Module, config: Any, otherwise: str = "", detail: str = "") -> Any:
    """``config.tokenizer``, else the model's own, else a ConfigError that names the fixes."""
    if config.tokenizer is not None:
        return config.tokenizer
    tok, why = find_tokenizer(model)
    if tok is None:
        raise ConfigError(
            f"{type(config).__name__} calibrates on text{detail} and needs the model's tokenizer: {why}; pass "
            f"tokenizer=tok, calibration_ids=[token ids]{otherwise}; a model loaded with infertrix.models.load "
            "carries its tokenizer"
        )
    return tok


@torch.no_grad()
def run_windows(model: nn.Module, windows: Tensor, progress: bool = True, desc: str = "calibrating") -> None:
    """One forward pass per window (no cache; logits of the last position only, since calibration
    reads hidden states through hooks), with a tqdm progress bar."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        model(input_ids=row.unsqueeze(0).to(device), use_cache=False, logits_to_keep=1)
