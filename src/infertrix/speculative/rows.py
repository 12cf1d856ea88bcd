"""Each row's side of the speculative loop (:mod:`.loop`): its tokens, where it stops, and the
columns sent to a streamer. Rows of a batch advance by different amounts; the result is assembled
as ``generate`` would."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria


class Rows:
    """Each row's generated tokens and where it stops. Rows advance by different amounts: with an eos
    criterion a row ends at its stop; without one, every row generates up to the longest stop."""

    def __init__(self, first: list[int], stopper: Stopper, has_eos: bool, max_new: int):
        self.stopper = stopper
        self.has_eos = has_eos
        self.max_new = max_new
        self.gen: list[list[int]] = [[t] for t in first]
        self.stop_len: list[int | None] = [None] * len(first)
        self.final_len: int | None = None  # without eos: known once every row has stopped
        for b, g in enumerate(self.gen):
            hit = stopper.first_stop(b, [], g)
            if hit is not None:
                self.stop_len[b] = hit + 1

    def live(self) -> list[bool]:
        """Cut each row at its stop; which rows still generate."""
        if self.has_eos:
            for g, stop in zip(self.gen, self.stop_len, strict=True):
                if stop is not None:
                    del g[stop:]
            return [stop is None for stop in self.stop_len]
        if all(s is not None for s in self.stop_len):
            self.final_len = max(self.stop_len)
            for g in self.gen:
                del g[self.final_len:]
        return [self.final_len is None or len(g) < self.final_len for g in self.gen]

    def limits(self, live: list[bool]) -> list[int]:
        """Draft tokens each row may take: room for them plus the verifier's own token."""
        cap = self.final_len if self.final_len is not None else self.max_new
        return [max(0, cap - len(g) - 1) if a else 0 for g, a in zip(self.gen, live, strict=True)]

    def extend(self, b: int, new: list[int]) -> None:
        """Append row b's accepted tokens, noting the first stop among them."""
        if self.stop_len[b] is None:
            hit = self.stopper.first_stop(b, self.gen[b], new)
            if hit is not None:
                self.stop_len[b] = len(self.gen[b]) + hit + 1
        self.gen[b].extend(new)

    def sequences(self, input_ids: Tensor, pad_id: int) -> Tensor:
        """The prompt followed by each row's tokens, shorter rows padded."""
        total = max(len(g) for g in self.gen)
        out = torch.full((len(self.gen), total), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        for b, g in enumerate(self.gen):
            out[b, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
        return torch.cat([input_ids, out], dim=1)


class Stopper:
    """Stopping criteria evaluated per row and per emitted token, with the history ``generate``
    would pass (the left-padded prompt row followed by the row's tokens)."""

    def __init__(self, criteria, input_ids: Tensor, prompt_len: int, max_len: int):
        self.criteria = criteria
        self.input_ids = input_ids
        self.prompt_len = prompt_len
        self.max_len = max_len
        self.fast = all(isinstance(c, MaxLengthCriteria | EosTokenCriteria) for c in criteria)
        eos = set()
        for c in criteria:
            if isinstance(c, EosTokenCriteria):
                eos.update(int(t) for t in c.eos_token_id.flatten().tolist())
            if isinstance(c, MaxLengthCriteria):
                self.max_len = min(self.max_len, int(c.max_length))
        self.eos = eos

    def row_ids(self, b: int, tokens: list[int]) -> Tensor:
        row = self.input_ids[b]
        return torch.cat([row, row.new_tensor(tokens)]) if tokens else row

    def first_stop(self, b: int, before: list[int], new: list[int]) -> int | None:
        """Index in ``new`` of the first token after which row b stops, or None."""
        if self.fast:
            for i, t in enumerate(new):
                if t in self.eos or self.prompt_len + len(before) + i + 1 >= self.max_len:
                    return i
            return None
        for i in range(len(new)):
            seq = self.row_ids(b, before + new[: i + 1])
            if bool(self.criteria(seq[None], None)[0]):
                return i
        return None


def emit(streamer, gen, active, emitted, pad_id, final_len) -> int:
    """Send the columns every row has reached to the streamer, one ``[batch]`` tensor each."""
    if streamer is None:
        return emitted
    lens = [len(g) for g, a in zip(gen, active, strict=True) if a]
    ready = min(lens) if lens else max(len(g) for g in gen)
    if final_len is not None:
        ready = min(ready, final_len)
    for c in range(emitted, ready):
        streamer.put(torch.tensor([g[c] if c < len(g) else pad_id for g in gen], dtype=torch.long))
    return max(emitted, ready)
