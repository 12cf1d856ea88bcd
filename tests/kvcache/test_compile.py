"""KV-cache policies under ``torch.compile``: same tokens as uncompiled, and one line, not a wall of warnings."""

from __future__ import annotations

import logging
import warnings

import torch
from conftest import make_tiny

import infertrix as ix


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


def test_compiled_forward_with_snapkv_gives_the_same_tokens_and_one_line(capfd):
    torch._dynamo.reset()
    torch_log = Lines()  # dynamo's graph-break and recompile-limit warnings (its loggers do not propagate)
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo", "torch._inductor")]
    model = make_tiny("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=32)
    ix.optimize(model, "snapkv:0.5")  # the default 32-token window: a 40-token prompt compresses
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    capfd.readouterr()
    model.forward = torch.compile(model.forward)
    for lg in loggers:
        lg.addHandler(torch_log)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # a second generate: no recompilation, no second warning
                assert torch.equal(model.generate(ids, **kw), ref)
    finally:
        for lg in loggers:
            lg.removeHandler(torch_log)
    assert torch_log.lines == []
    assert capfd.readouterr().err == ""
    about = [str(w.message) for w in caught if "compile" in str(w.message) or "infertrix" in str(w.message)]
    assert len(about) == 1 and "\n" not in about[0], about
    assert "runs eagerly" in about[0]
    torch._dynamo.reset()
