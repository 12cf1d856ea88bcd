"""Recipe strings: a compact text form of a list of transforms, for the CLI and configs.

Grammar: transforms separated by commas; each is ``name``, ``name:value`` (sets the transform's
primary field, e.g. ``snapkv:0.5``), ``name(key=value, ...)``, or ``name:value(key=value, ...)``.
Values are read as int, float, true/false, none, or else a string (a field that takes a string
gets the text as written). ``baseline`` (or an empty string) is the empty list. Unknown names and
fields are refused with the closest known ones suggested.

    parse_recipe("w4a8(group_size=64),snapkv:0.5") -> [W4A8(group_size=64), SnapKV(compression=0.5)]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .calibration import RENAMED_FIELDS
from .registry import did_you_mean, get_transform
from .transform import ConfigError, Transform, plain_field_types

_ITEM = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?::\s*([^()]+?))?\s*(?:\((.*)\))?\s*$", re.S)


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ')' in recipe {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ConfigError(f"unbalanced '(' in recipe {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


def _field_value(allowed: tuple[type, ...] | None, text: str) -> Any:
    """``parse_value``, except that a field taking a string (and no number) gets the text itself."""
    v = parse_value(text)
    if isinstance(v, bool | int | float) and allowed and str in allowed and not {bool, int, float} & set(allowed):
        return text.strip().strip("'\"")  # a name that looks like a number stays a name
    return v


def parse_recipe(recipe: str) -> list[Transform]:
    """Parse a recipe string into transform objects (validated like direct construction)."""
    if recipe is None or recipe.strip().lower() in ("", "baseline", "none"):
        return []
    out = []
    for item in _split_top(recipe):
        if item.lower() == "baseline":
            continue
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(f"cannot parse recipe item {item!r}; expected name, name:value or name(key=value)")
        name, primary_value, kwargs_text = m.groups()
        cls = get_transform(name)
        types = plain_field_types(cls)
        kwargs: dict[str, Any] = {}
        if primary_value is not None:
            if cls.primary is None:
                raise ConfigError(f"{name} takes no ':value'; use {name}(key=value) with one of its fields")
            kwargs[cls.primary] = _field_value(types.get(cls.primary), primary_value)
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        for kv in _split_top(kwargs_text or ""):
            if "=" not in kv:
                raise ConfigError(f"recipe argument {kv!r} of {name} must be key=value")
            key, text = (s.strip() for s in kv.split("=", 1))
            if key not in fields:
                renamed, note = RENAMED_FIELDS.get(key, ("", ""))
                hint = f" (renamed: use {renamed!r}{note})" if renamed in fields else did_you_mean(key, fields)
                raise ConfigError(f"{name} has no field {key!r}{hint}; its fields are {sorted(fields)}")
            kwargs[key] = _field_value(types.get(key), text)
        try:
            out.append(cls(**kwargs))
        except TypeError as exc:
            raise ConfigError(f"bad arguments for {name}: {exc}") from None
    return out
