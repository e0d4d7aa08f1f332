"""Pipelines as text, MLIR style: ``name{opt=value,...}`` items separated by commas.

    find-moe,canonicalize-moe,collect-routing{batch_size=8},allocate-bits{budget=2.5,bits=2:3:4}

Options are the pass's dataclass fields; values are parsed by the field's annotation
(tuples as ``a:b:c``, booleans as ``true``/``false``, Literal choices checked). A pipeline
prints back to the same text with default-valued options left out, so a run is reproducible
from the text its report records.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modec.errors import ModecError, UsageError

if TYPE_CHECKING:
    from modec.pipeline import Pass


def format_value(value: Any) -> str:
    """One option value as pipeline text."""
    if isinstance(value, tuple | list):
        return ":".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_value(raw: str, annotation: Any, where: str) -> Any:
    """One option value from text, by the field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    try:
        if origin is tuple:
            return tuple(parse_value(v, args[0], where) for v in raw.split(":") if v)
        if origin is typing.Literal:
            if raw not in args:
                raise ValueError(f"choose from {list(args)}")
            return raw
        if annotation is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if args and type(None) in args:  # Optional[X]
            if raw in ("", "none", "None"):
                return None
            inner = next(a for a in args if a is not type(None))
            return parse_value(raw, inner, where)
        return raw
    except ValueError as exc:
        raise UsageError(f"{where}: bad value {raw!r} ({exc})") from exc


def split_top(text: str) -> list[str]:
    """Split on commas that are not inside braces."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_pass(text: str, registry: Mapping[str, type[Pass]]) -> Pass:
    """One pass from ``name`` or ``name{opt=value,...}``."""
    name, _, rest = text.partition("{")
    name = name.strip()
    if name not in registry:
        raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(sorted(registry))}")
    cls = registry[name]
    kwargs: dict[str, Any] = {}
    if rest:
        if not rest.endswith("}"):
            raise UsageError(f"pass {text!r}: missing '}}'")
        hints = typing.get_type_hints(cls)
        fields: set[str] = (
            {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        )
        for item in split_top(rest[:-1]):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if key in cls.removed_options:
                raise UsageError(
                    f"pass {name}: option {key!r} was removed: {cls.removed_options[key]}"
                )
            if not eq or key not in fields:
                raise UsageError(
                    f"pass {name}: unknown option {key!r}; options: {', '.join(sorted(fields))}"
                )
            kwargs[key] = parse_value(raw.strip(), hints[key], f"pass {name} option {key}")
    try:
        return cls(**kwargs)
    except ModecError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name}: {exc}") from exc
