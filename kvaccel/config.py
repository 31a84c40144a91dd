"""Method configs: the base dataclass every method derives from, budgets, and the method registry."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from kvaccel.checks import is_number
from kvaccel.presets import PRESETS

STAGES = ("prefill", "evict", "channels", "decode", "storage")

_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class Method:
    """Base of every method config. A method belongs to one ``stage``; at most one method per stage."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    #: import names of optional packages the method needs, with the pip requirement to print
    requires: ClassVar[dict[str, str]] = {}

    def check_dependencies(self) -> None:
        """Raise ``ImportError`` naming the missing optional package and the install command."""
        for module, requirement in self.requires.items():
            if importlib.util.find_spec(module) is None:
                raise ImportError(
                    f"method '{self.name}' needs the optional package '{module}', which is not installed; "
                    f"install it with: pip install '{requirement}'"
                )

    def bind(self, model) -> None:
        """Check the method against the model it is patched into (layers, heads...). Raise ``ValueError``."""

    def report_stats(self, cache, layer_stats: list[dict]) -> None:
        """Fill ``layer_stats`` (one dict per layer) with statistics read from ``cache`` when :func:`kvaccel.report`
        is called, for what would cost too much to record at every decode step. Default: nothing."""

    def spec(self) -> str:
        """The method as a spec string, e.g. ``streaming(budget=256,sink=4)``."""
        args = ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({args})" if args else self.name


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method config reachable by its ``name`` (``patch(model, "name")``)."""
    if cls.stage not in STAGES:
        raise ValueError(f"method {cls.__name__} has stage {cls.stage!r}; expected one of {STAGES}")
    if not cls.name:
        raise ValueError(f"method {cls.__name__} needs a non-empty `name`")
    if cls.name in PRESETS:
        raise ValueError(f"method {cls.__name__}: '{cls.name}' is a preset's name (kvaccel/presets.py); pick another")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    _load_builtin_methods()
    return dict(_REGISTRY)


def _load_builtin_methods() -> None:
    # Importing the method packages registers their configs; done lazily so importing kvaccel stays cheap.
    import kvaccel.patches.channels
    import kvaccel.patches.decode
    import kvaccel.patches.evict
    import kvaccel.patches.prefill
    import kvaccel.patches.storage  # noqa: F401


def method_class(name: str) -> type[Method]:
    reg = registry()
    if name not in reg:
        close = difflib.get_close_matches(name, [*reg, *PRESETS], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown method '{name}'.{hint} Available: {', '.join(sorted(reg))}; presets: {', '.join(PRESETS)}"
        )
    return reg[name]


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, stage, config fields (name, type, default) and a one-line summary."""
    out = []
    for name, cls in sorted(registry().items(), key=lambda kv: (STAGES.index(kv[1].stage), kv[0])):
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append(
            {
                "name": name,
                "stage": cls.stage,
                "summary": doc[0] if doc else "",
                "fields": [
                    {"name": f.name, "type": str(f.type), "default": f.default}
                    for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING
                ]
                + [
                    {"name": f.name, "type": str(f.type), "default": None}
                    for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                ],
            }
        )
    return out


# --------------------------------------------------------------------------------------------- budgets


def validate_budget(budget: float, field: str = "budget") -> int | float:
    """An int is tokens kept per head (>= 1); a float in (0, 1] is a fraction of the prompt."""
    if not is_number(budget):
        raise ValueError(f"{field} must be an int (tokens) or a float in (0, 1] (fraction), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"{field} ({budget}) must be >= 1 token; use a float in (0, 1] for a fraction")
    elif not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(
            f"{field} ({budget}) as a fraction of the prompt must be in (0, 1]; pass an int for a token count"
        )
    return budget


def resolve_budget(budget: float, prompt_len: int) -> int:
    """Tokens to keep for a prompt of ``prompt_len`` tokens (may exceed it: then nothing is evicted)."""
    if isinstance(budget, float):
        return max(1, math.ceil(budget * prompt_len))
    return int(budget)


# --------------------------------------------------------------------------------------------- spec strings

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (p.strip() for p in parts) if p]


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in _split_top(text, ","):
        if "=" not in item:
            raise ValueError(f"in method spec '{spec}': argument '{item}' must be written key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw  # bare words, e.g. backend=torch
    return kwargs


def split_spec(part: str) -> tuple[str, dict[str, Any]]:
    """``"name(key=value, ...)"`` (one method, no ``+``) -> ``(name, kwargs)``; a nested spec as a value stays a
    string (``critical(scorer=snapkv(window=16))`` gives ``{"scorer": "snapkv(window=16)"}``)."""
    m = _SPEC.match(part)
    if not m:
        raise ValueError(f"cannot parse method spec '{part}'; expected name or name(key=value, ...)")
    return m.group(1), _parse_kwargs(m.group(2) or "", part)


def parse_spec(spec: str) -> list[Method]:
    """Parse ``"sale+keyformer(budget=0.25)+think(ratio=0.4)"`` into method configs."""
    out = []
    for part in _split_top(spec, "+"):
        name, kwargs = split_spec(part)
        out.extend(_expand_preset(name, kwargs) if name in PRESETS else [build_method(name, kwargs)])
    return out


def _expand_preset(name: str, kwargs: dict[str, Any]) -> list[Method]:
    """The configs of preset ``name`` (``kvaccel/presets.py``), its settings overridden by ``kwargs``."""
    spec = PRESETS[name].spec
    if not kwargs:
        return parse_spec(spec)
    if len(_split_top(spec, "+")) != 1:
        raise ValueError(f"preset '{name}' stands for several methods ({spec}); write that spec with your options")
    m = _SPEC.match(spec)
    return [build_method(m.group(1), {**_parse_kwargs(m.group(2) or "", spec), **kwargs})]


def build_method(name: str, kwargs: dict[str, Any]) -> Method:
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(
            f"method '{name}' has no option(s) {sorted(unknown)}; its options are {sorted(fields) or 'none'}"
        )
    return cls(**kwargs)
