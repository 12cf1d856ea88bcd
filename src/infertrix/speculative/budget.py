"""How many tokens to draft: the length that maximises expected tokens per second, measured on-line.

Leviathan, Kalman & Matias (ICML 2023, https://arxiv.org/abs/2211.17192, section 3.4) pick the
draft length ``k`` that maximises ``E[tokens] / cost`` with ``E[tokens] = (1 - a^(k+1)) / (1 - a)``
for a per-token acceptance rate ``a``; SpecDec++ (Huang et al. 2024,
https://arxiv.org/abs/2405.19715) and SWIFT adapt the length during decoding. Here both terms are
measured during the call instead of assumed:

- :class:`VerifyCost` learns the seconds of one verification forward as a function of its width
  (1 + draft length). On a small model on a CPU the width is not free (a forward over 11
  positions costs clearly more than over 1), so the cost curve, not a fixed length, decides.
- :class:`AcceptanceRate` is a decayed count of accepted and rejected draft positions (a
  position after the first rejection is never tested, so it counts neither way).

:func:`best_length` returns the ``k`` (0 = draft nothing: a plain decoding step) with the most
expected tokens per second for all rows of the batch together: every row pays for the widest
draft, so a batch drafts one common length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class AcceptanceRate:
    """Per-position acceptance probability, a decayed ratio of accepted to tested positions.

    ``prior_accepted / (prior_accepted + prior_rejected)`` is the estimate before any evidence; each
    observation is weighted ``1`` and older ones fade by ``decay`` per update."""

    prior_accepted: float = 1.0
    prior_rejected: float = 1.0
    decay: float = 0.95
    accepted: float = field(init=False)
    rejected: float = field(init=False)

    def __post_init__(self) -> None:
        self.accepted = self.prior_accepted
        self.rejected = self.prior_rejected

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, drafted: int, accepted: int) -> None:
        """One verified draft of ``drafted`` tokens of which the first ``accepted`` were kept."""
        if drafted <= 0:
            return
        self.accepted = self.accepted * self.decay + accepted
        self.rejected = self.rejected * self.decay + (1 if accepted < drafted else 0)


@dataclass
class VerifyCost:
    """Seconds of a verification forward of width ``w`` (positions per row), learnt on-line.

    Each width seen keeps an exponential moving average of its time; widths not seen yet are
    extrapolated from a least-squares line through the seen ones, or, with only one width seen,
    from ``prior_slope`` (extra cost of one more position, as a fraction of the width-1 time)."""

    prior_slope: float = 0.05
    smoothing: float = 0.3
    times: dict[int, float] = field(default_factory=dict)

    def observe(self, width: int, seconds: float) -> None:
        old = self.times.get(width)
        self.times[width] = seconds if old is None else old + self.smoothing * (seconds - old)

    def time(self, width: int) -> float:
        if width in self.times:
            return self.times[width]
        if not self.times:
            return 1.0 + self.prior_slope * (width - 1)  # only ratios matter before any measurement
        ws = sorted(self.times)
        if len(ws) == 1:
            w0 = ws[0]
            base = self.times[w0] / (1.0 + self.prior_slope * (w0 - 1))
            return base * (1.0 + self.prior_slope * (width - 1))
        n = len(ws)
        mx = sum(ws) / n
        my = sum(self.times[w] for w in ws) / n
        sxx = sum((w - mx) ** 2 for w in ws)
        slope = max(sum((w - mx) * (self.times[w] - my) for w in ws) / sxx, 0.0)
        return max(my + slope * (width - mx), 1e-9)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens emitted by one verification of a ``k``-token draft with per-position acceptance ``rate``
    (accepted drafts plus the model's own token)."""
    if k <= 0:
        return 1.0
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


def best_length(
    rates: list[float | None],
    caps: list[int],
    cost: VerifyCost,
    draft_seconds: float = 0.0,
    fixed_seconds: float = 0.0,
) -> int:
    """The common draft length (0..max cap) with the most expected tokens per second.

    rates[b]: row b's acceptance rate, or None when the row has nothing to draft; caps[b]: the most
    tokens row b can draft; draft_seconds: drafting cost per drafted token (0 for copies);
    fixed_seconds: drafting cost paid once whenever anything is drafted."""
    top = max((c for c, r in zip(caps, rates, strict=True) if r is not None), default=0)
    best_k, best = 0, len(rates) / cost.time(1)
    for k in range(1, top + 1):
        tokens = sum(
            expected_tokens(r, min(k, c)) if r is not None else 1.0 for r, c in zip(rates, caps, strict=True)
        )
        per_second = tokens / (cost.time(k + 1) + fixed_seconds + k * draft_seconds)
        if per_second > best:
            best_k, best = k, per_second
    return best_k


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every linear layer's, quantized or float (a tied
    head counted with the layers: it is read every step)."""
    from ..quant.linear_base import QuantizedLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.storage_bytes()
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def best_case_speedup(draft_ratio: float, cost: VerifyCost, cap: int, rate: float) -> float:
    """Speed of drafting over plain steps if every draft position were accepted with probability
    ``rate``: the best length's expected tokens per second (a draft forward costing ``draft_ratio``
    of a plain step, verification ``cost``) over one token per plain step (at least 1.0)."""
    step = cost.time(1)
    best = 1.0
    for k in range(1, cap + 1):
        per_step = expected_tokens(rate, k) * step / (cost.time(k + 1) + k * draft_ratio * step)
        best = max(best, per_step)
    return best
