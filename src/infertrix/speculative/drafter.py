"""What a drafter is: it proposes tokens for every row; the verifier decides which are kept.

A :class:`Drafter` sees each row's verified tokens (prompt without padding, then the generated
tokens; the last one is the newest, not yet verified-through) and proposes up to ``limits[b]``
tokens for row ``b``. It may also return the probabilities it drew them from (a draft model under
sampling); without them the verifier treats each draft token as a point mass, which keeps the
speculative-sampling rule exact (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192,
appendix A.5: any proposal distribution works as long as it is the one the token was drawn from).

How long a draft should be is decided in :mod:`.budget` from the measured acceptance and the
measured cost of a verification forward per width (``DraftContext.cost``, kept by the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .budget import VerifyCost


@dataclass
class Draft:
    """Proposed tokens: ``tokens[b]`` for row b (possibly empty); ``probs[b]`` is a
    ``[len(tokens[b]), vocab]`` tensor of the distributions they were sampled from, or None
    (point masses: greedy drafts, n-gram copies). ``trees[b]``, when given, is a
    :class:`~.tree.TokenTree` of point-mass branches for row b, verified in one forward where the
    cache allows (else ``tokens[b]``, its best branch, is verified)."""

    tokens: list[list[int]]
    probs: list[Tensor] | None = None
    trees: list | None = None


@dataclass
class DraftContext:
    """What a drafter may know about the ``generate`` call it serves.

    ``warp(logits [N, V]) -> logits`` applies the call's logits processors that do not depend on
    the token history (temperature, top-k, top-p, min-p...), so a draft model can sample from a
    distribution shaped like the target's. ``cost`` is the loop's measured seconds per
    verification forward as a function of its width (see :mod:`.budget`). ``prefill_seconds`` (the
    call's prompt forward, set once it has run) and ``max_new_tokens`` let a drafter weigh a cost
    paid once per call against what the call can still save.
    """

    do_sample: bool
    batch_size: int
    pad_token_id: int
    warp: Callable[[Tensor], Tensor]
    cost: VerifyCost = field(default_factory=VerifyCost)
    prefill_seconds: float | None = None
    max_new_tokens: int | None = None
    target_kv: object | None = None  # the loop's RaggedKV over the model's cache (a draft may share it)


class Drafter:
    """Base class: one instance serves one ``generate`` call (``start`` ... ``propose``*)."""

    def start(self, model: torch.nn.Module, ctx: DraftContext) -> None:
        """Called once per ``generate`` call, before the first proposal."""
        self.ctx = ctx

    def propose(self, seqs: list[list[int]], limits: list[int]) -> Draft:
        raise NotImplementedError

    def observe(self, drafted: list[int], accepted: list[int]) -> None:
        """Called after each verification with per-row drafted and accepted counts."""

    # True: the loop calls observe_window after every verification forward (and only then computes
    # the per-slot argmax it passes); drafters that learn from the model's own outputs set it.
    reads_window = False

    def observe_window(self, fed: list[list[int]], argmax: list[list[int]], parents: list[list[int]] | None) -> None:
        """Row b's fed slots ``fed[b]`` (its newest token, then the draft; empty for a stopped row),
        the model's argmax after its processed scores at each slot ``argmax[b]`` (only the first
        ``len(fed[b])`` count), and for a token tree each slot's parent slot (-1 for slot 0; None: a
        chain). Called only where ``reads_window`` is set, for plain steps too."""


def window_reader(drafter: Drafter) -> Drafter | None:
    """The drafter that reads verification windows: ``drafter`` or the one a wrapper (the
    never-slower guard) holds as ``inner``; None when neither does (nothing is computed for it)."""
    while drafter is not None and not drafter.reads_window:
        drafter = getattr(drafter, "inner", None)
    return drafter
