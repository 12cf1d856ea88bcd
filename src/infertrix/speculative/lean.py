"""Drafts through the decode engine: a draft model's rows run as :class:`infertrix.engine.runner.Runner`
calls on its own :class:`~infertrix.engine.EngineCache`, without transformers' per-call machinery.

A draft model's forward is run once per draft token, and a small draft's compute is so little
that transformers' per-layer Python (mask and position bookkeeping, cache objects, module hooks,
the attention-interface dispatch) costs more than its weights: SmolLM2's W4A8 self-draft spent
~3.3 ms of a 9.9 ms step in its matrix kernels (1 thread) on the module path. The Medusa / EAGLE /
SWIFT research code gets its speed partly the same way, by running the draft outside the
framework's generic path. The engine runs each decoder layer as one fused op (quantized q/k/v
and gate/up projections fused, the fused weights viewed by the original modules, so nothing is
stored twice) over preallocated KV buffers that roll back by moving a length; a draft of several
rows keeps them left-padded (:class:`~.aligned.AlignedKV`).

Drafting needs no exactness (the target verifies every token), but the engine's draft logits
equal the draft model's own forward to float32 rounding (tested). Self-speculation's skip plans
draft here too: the runner skips the plan's layers and sublayers per forward (``engine/skips.py``),
on the draft's own cache, without swapping any module. Drafts the engine does not run (other
architectures or dtypes, see :func:`infertrix.engine.why_unsupported`) and drafts under any other
context that changes the model take the module path (:class:`~.ragged.RaggedKV`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.generation import left_padding_start
from ..core.parallel import tensor_parallel
from ..engine.cache import EngineCache
from ..engine.plan import fingerprint, why_unsupported
from ..engine.runner import Runner
from ..engine.transform import engine_runtime
from ..skip import SkipPlan
from .aligned import AlignedKV
from .state import speculative_state


def lean_supported(model: nn.Module) -> str | None:
    """None when drafts of ``model`` run on the engine, else why not."""
    if tensor_parallel(model) is not None:  # the engine reads whole heads and weights
        return "the draft is sharded by tensor parallelism (the engine runs whole layers)"
    return why_unsupported(model)


def draft_runner(draft: nn.Module) -> Runner | None:
    """The draft's engine :class:`Runner` (built once and kept in the draft's run-time record;
    rebuilt if its modules were replaced since), or None when the engine does not run it. A draft
    that is the engine's model itself (self-speculation) shares the engine's runner: a second one
    would fuse its quantized projections again."""
    runtime = engine_runtime(draft)
    if runtime is not None and runtime.supported() and tensor_parallel(draft) is None:
        return runtime.runner
    st = speculative_state(draft, create=True)
    if st.lean is not None and st.lean[0] == fingerprint(draft):
        return st.lean[1]
    runner = Runner(draft) if lean_supported(draft) is None else None
    st.lean = (fingerprint(draft), runner)  # building it replaces no module
    return runner


class EngineDraftKV(AlignedKV):
    """A draft model's rows on the engine: RaggedKV's calls plus ``last_logits`` (the drafter's)."""

    def __init__(self, draft: nn.Module, runner: Runner, pad_token_id: int, skip: SkipPlan | None = None):
        super().__init__(draft, EngineCache(draft.config), pad_token_id)
        self.runner = runner
        self.skip = skip

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, keep: int | Tensor) -> Tensor:
        start = left_padding_start(mask, mask.shape[1])
        return self.runner.forward(ids, start, positions.contiguous(), self.cache, keep, self.skip)

    def last_logits(self, feed: list[list[int]]) -> Tensor:
        """Logits ``[B, V]`` after each row's fed tokens (a row fed nothing: junk)."""
        return self.extend(feed, keep=1)[:, 0]


def engine_draft_kv(draft: nn.Module, batch: int, pad_token_id: int,
                    skip: SkipPlan | None = None) -> EngineDraftKV | None:
    """An empty engine draft cache of ``batch`` rows drafting with ``skip`` (a self-speculation
    plan) on top of the draft's own plans, or None when the engine does not run ``draft``."""
    runner = draft_runner(draft)
    if runner is None:
        return None
    kv = EngineDraftKV(draft, runner, pad_token_id, skip)
    kv.begin(batch, next(draft.parameters()).device)
    return kv


__all__ = ["EngineDraftKV", "draft_runner", "engine_draft_kv", "lean_supported"]
