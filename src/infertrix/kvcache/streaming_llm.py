"""StreamingLLM: keep the first tokens (attention sinks) and a recent window.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
https://arxiv.org/abs/2309.17453.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import ConfigError, register_transform
from .context import ScoreContext
from .policy import KVPolicy


@register_transform("streamingllm", "streaming_llm")
@dataclass
class StreamingLLM(KVPolicy):
    """Attention sinks + recent window. Needs no attention scores (the cheapest policy). Lossy.

    - ``sink_tokens``: first real tokens of each row always kept (the paper uses 4).
    Every other kept token is the most recent; the budget fixes the window length.
    """
    use_when = "endless streams where only recent context matters: the cheapest policy, no attention scores"

    sink_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        if self.sink_tokens < 0:
            raise ConfigError(f"StreamingLLM.sink_tokens must be >= 0, got {self.sink_tokens}")

    def fixed_part(self) -> tuple[int, str, str]:
        return self.sink_tokens, f"the attention sinks, sink_tokens={self.sink_tokens}", "fewer sink_tokens"

    def score(self, ctx: ScoreContext) -> Tensor:
        b, h, s, _ = ctx.keys.shape
        slot = torch.arange(s, device=ctx.keys.device, dtype=torch.float32)
        vis = (
            ctx.visible
            if ctx.visible is not None
            else torch.ones(b, s, dtype=torch.bool, device=slot.device)
        )
        rank = torch.cumsum(vis.to(torch.int64), dim=-1)  # 1-based rank among the row's real tokens
        sink = vis & (rank <= self.sink_tokens)
        score = slot.expand(b, s) + sink.float() * 1e30
        return score[:, None, :].expand(b, h, s)
