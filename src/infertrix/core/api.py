"""``optimize``, ``describe`` and ``restore``: the one verb and its two companions.

``optimize(model, *transforms)`` changes the model in place and returns it, so it drops into
scripts, notebooks, ``pipeline(...)`` and evaluation harnesses that take a model object. It
applies transforms by stage (weights -> experts -> kernels -> layers -> cache -> decoding), refuses
conflicting combinations before changing anything, and keeps what it applied in the model's one
run-time record (:mod:`.state`) that ``describe`` reads and ``restore`` unwinds.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .model import model_type, require_causal_lm, tensor_bytes
from .parallel import check_tensor_parallel
from .recipe import parse_recipe
from .registry import available
from .state import STATE_ATTR, state
from .transform import Applied, ConflictError, Stage, Transform, UnsupportedModelError


def _check_is_model(model: Any, verb: str) -> None:
    if not isinstance(model, nn.Module):
        hint = " (the model comes first: optimize(model, 'w4a8,pld'))" if isinstance(model, str | Transform) else ""
        raise TypeError(
            f"{verb}() takes a PyTorch model (a torch.nn.Module, e.g. from "
            f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}{hint}"
        )


def applied_transforms(model: nn.Module) -> list[Transform]:
    st = state(model)
    return [a.transform for a in st.applied] if st else []


def _as_transforms(items: tuple[Transform | str, ...]) -> list[Transform]:
    out: list[Transform] = []
    for item in items:
        if isinstance(item, str):
            out.extend(parse_recipe(item))
        elif isinstance(item, Transform):
            out.append(item)
        elif isinstance(item, list | tuple):
            out.extend(_as_transforms(tuple(item)))
        else:
            raise TypeError(f"optimize() takes Transform objects or recipe strings, got {type(item).__name__}")
    return out


def _check_conflicts(existing: list[Transform], new: list[Transform]) -> None:
    groups: dict[str, Transform] = {}
    for t in existing + new:
        if t.conflict_group is None:
            continue
        other = groups.get(t.conflict_group)
        if other is not None:
            raise ConflictError(
                f"{type(t).__name__} and {type(other).__name__} both set the model's "
                f"{t.conflict_group}; keep one of them (restore(model) removes what is applied)"
            )
        groups[t.conflict_group] = t
    if existing and new:
        last = max(t.stage for t in existing)
        early = [t for t in new if t.stage < last]
        if early:
            raise ConflictError(
                f"{type(early[0]).__name__} ({early[0].stage.name.lower()} stage) must be applied before "
                f"the {Stage(last).name.lower()}-stage transforms already on the model; "
                "restore(model) and pass all transforms to one optimize() call"
            )


def _lift_defaults(model: nn.Module) -> list[Applied]:
    """Undo the transforms ``optimize`` added on its own (always the newest records), newest first."""
    st = state(model)
    lifted: list[Applied] = []
    while st is not None and st.applied and st.applied[-1].by_default and st.applied[-1].undo is not None:
        a = st.applied.pop()
        a.undo()
        lifted.append(a)
    return lifted


def _defaults(model: nn.Module, present: list[Transform]) -> tuple[list[Transform], dict[str, str]]:
    """The ``default_on`` transforms to add to ``model`` beside ``present``, and why others are not."""
    add, off = [], {}
    for cls in available().values():
        if not cls.default_on or any(isinstance(t, cls) for t in present):
            continue
        t = cls()
        if t.stage.acts_through_generate:
            try:
                require_causal_lm(model, t.name)
            except UnsupportedModelError:
                continue  # nothing generates, so there is nothing for it to do
        why = t.default_problem(model)
        if why:
            off[t.name] = why
        else:
            add.append(t)
    return add, off


def _apply_all(model: nn.Module, new: list[Transform], defaults: list[Transform]) -> None:
    st = state(model, create=True)
    done: list[Applied] = []
    try:
        for t in new + defaults:
            applied = t.apply(model)
            if not isinstance(applied, Applied):
                raise TypeError(f"{type(t).__name__}.apply must return an Applied record")
            applied.by_default = any(t is d for d in defaults)
            done.append(applied)
            st.applied.append(applied)
    except BaseException:
        for a in reversed(done):
            st.applied.remove(a)
            if a.undo is not None:
                a.undo()
        raise


def optimize(model: nn.Module, *transforms: Transform | str, defaults: bool = True) -> nn.Module:
    """Apply ``transforms`` (objects or recipe strings) to ``model`` in place and return it.

    Transforms marked ``default_on`` (the decode engine) are added too, last, unless the call or
    the model has one already (``engine(enabled=false)`` is the opt-out) or ``defaults`` is False
    (a model that is only a part of another, such as a speculative draft run by its target's
    engine); ``describe`` says why one was not added. Raises ConfigError / ConflictError / UnsupportedModelError before changing
    anything when the combination or the model is not supported (cache and decoding transforms
    need a model that can ``generate``; TypeError when ``model`` is not a torch module). If a
    transform fails while applying, the ones this call already applied are undone (where they
    can be) and the model is left as it was before the error propagates.
    """
    _check_is_model(model, "optimize")
    use_defaults = defaults
    new = sorted(_as_transforms(transforms), key=lambda t: int(t.stage))
    st = state(model)
    fresh = st is None
    lifted = _lift_defaults(model)
    existing = [a.transform for a in st.applied] if st else []
    try:
        _check_conflicts(existing, new)
        check_tensor_parallel(model, new)
        defaults, off = _defaults(model, existing + new)
        if not use_defaults:
            defaults, off = [], {t.name: "optimize was called with defaults=False" for t in defaults} | off
        for t in new + defaults:
            if t.stage.acts_through_generate:
                require_causal_lm(model, t.name)
            t.check_model(model)  # may fill the model's record (a draft built once for it)
        _apply_all(model, new, defaults)
        state(model).defaults_off = off
    except BaseException:
        st = state(model)
        if lifted:
            _apply_all(model, [], [a.transform for a in reversed(lifted)])
        elif fresh and st is not None and not st.applied and not st.generate_hooks:  # leave no record behind
            model.__dict__.pop(STATE_ATTR, None)
        raise
    return model


_BYTES_KEY = re.compile(r"(^|_)bytes($|_)", re.I)


def mib(n: int) -> str:
    """A byte count as ``describe``'s text shows every one: MiB with two decimals."""
    return f"{n / 2**20:.2f} MiB"


def _shown(key: str, value: Any) -> Any:
    """A report value for the text form: byte counts (keys with a ``bytes`` word) in MiB."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(str(k), v)}" for k, v in value.items()) + "}"
    if _BYTES_KEY.search(key) and isinstance(value, int | float) and not isinstance(value, bool):
        return mib(value)
    return value


@dataclass
class Description:
    """What infertrix did to a model; ``str()`` gives a readable table, ``to_dict()`` the data.

    Byte counts are in bytes here and in MiB (two decimals) in the text. ``bytes_now`` counts every
    tensor the model keeps alive: its modules' and what transforms hold outside them
    (``bytes_held``: float layers kept for ``restore``, a quantized draft's weights). Each
    transform's ``params`` lists all its fields and ``changed_params`` those that differ from the
    defaults (what the text shows).
    """

    model_type: str
    bytes_before: int
    bytes_now: int
    transforms: list[dict[str, Any]]
    bytes_held: int = 0
    not_added: dict[str, str] = field(default_factory=dict)  # default_on transform -> why optimize left it off

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "bytes_before": self.bytes_before,
            "bytes_now": self.bytes_now,
            "bytes_held": self.bytes_held,
            "transforms": self.transforms,
            "not_added": self.not_added,
        }

    def __str__(self) -> str:
        head = f"{self.model_type}: weights {mib(self.bytes_before)} -> {mib(self.bytes_now)}"
        if self.bytes_held:
            head += f" (of which {mib(self.bytes_held)} held outside the model's modules)"
        lines = [head]
        if not self.transforms:
            lines.append("  no transforms applied")
        for t in self.transforms:
            params = ", ".join(f"{k}={v}" for k, v in t["changed_params"].items())
            tail = ("  (on by default)" if t["by_default"] else "") + ("" if t["reversible"] else "  (irreversible)")
            lines.append(f"  [{t['stage']}] {t['name']}({params})" + tail)
            if t["held_bytes"]:
                lines.append(f"      held outside the model: {mib(t['held_bytes'])}")
            for k, v in t["report"].items():
                lines.append(f"      {k}: {_shown(k, v)}")
        for name, why in self.not_added.items():
            lines.append(f"  {name}: not added by default: {why}")
        return "\n".join(lines)


def describe(model: nn.Module) -> Description:
    """Report what was applied: each transform's parameters, its live figures and the bytes the
    model keeps alive (its tensors and those transforms hold for it)."""
    _check_is_model(model, "describe")
    st = state(model)
    own = tensor_bytes(model)
    entries, held = [], []
    for a in st.applied if st else []:
        kept = list(a.held())
        held.extend(kept)
        entries.append(
            {
                "name": a.transform.name,
                "stage": a.transform.stage.name.lower(),
                "params": a.transform.params(),
                "changed_params": a.transform.changed_params(),
                "reversible": a.reversible,
                "by_default": a.by_default,
                "held_bytes": tensor_bytes(model, kept) - own,
                "report": a.report(),
            }
        )
    now = tensor_bytes(model, held)
    return Description(model_type(model), st.original_bytes if st else now, now, entries, bytes_held=now - own,
                       not_added=dict(st.defaults_off) if st else {})


@dataclass
class RestoreReport:
    restored: list[str]
    not_restored: dict[str, str]  # name -> why it cannot be undone

    @property
    def complete(self) -> bool:
        return not self.not_restored


def restore(model: nn.Module, strict: bool = False) -> RestoreReport:
    """Undo every applied transform that can be undone, newest first.

    Transforms that cannot be undone stay on the model; they are named with the reason in the
    returned report and in a warning (or, with ``strict=True``, a RuntimeError raised before
    anything is undone).
    """
    _check_is_model(model, "restore")
    st = state(model)
    if st is None:
        return RestoreReport([], {})
    stuck = {a.transform.name: a.irreversible_reason or "no undo" for a in st.applied if not a.reversible}
    if stuck and strict:
        raise RuntimeError(f"cannot fully restore the model: {stuck}")
    restored = []
    for a in reversed(list(st.applied)):
        if a.undo is None:
            continue
        a.undo()
        st.applied.remove(a)
        restored.append(a.transform.name)
    if stuck:
        msg = "; ".join(f"{k}: {v}" for k, v in stuck.items())
        warnings.warn(f"infertrix.restore: these transforms cannot be undone and stay applied: {msg}", stacklevel=2)
    else:
        del model.__dict__[STATE_ATTR]
    return RestoreReport(restored, stuck)
