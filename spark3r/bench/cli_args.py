"""Command-line flags for the reduction methods, generated from their config dataclasses so the
flag names are the field names (``query_keep`` -> ``--query-keep``; ROS: ``reduction.query_keep``)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from spark3r.accel.apply import METHODS


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_pair(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 2x2, got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected two integers like 2x2, got {text!r}") from e


def method_fields() -> dict[str, list[str]]:
    """field name -> methods that take it."""
    out: dict[str, list[str]] = {}
    for name, spec in METHODS.items():
        for f in dataclasses.fields(spec.config_cls):
            out.setdefault(f.name, []).append(name)
    return out


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reduction parameters (each applies to the methods that have it)")
    seen = set()
    for name, spec in METHODS.items():
        for f in dataclasses.fields(spec.config_cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default
            if isinstance(default, bool):
                kind: Any = _parse_bool
            elif isinstance(default, tuple):
                kind = _parse_pair
            elif isinstance(default, (int, float)):
                kind = type(default)
            else:
                kind = str
            takers = ", ".join(m for m, s in METHODS.items() if f.name in {x.name for x in dataclasses.fields(s.config_cls)})
            metavar = "RxC" if isinstance(default, tuple) else "BOOL" if isinstance(default, bool) else f.name.upper()
            group.add_argument("--" + f.name.replace("_", "-"), dest="m_" + f.name, type=kind, default=None,
                               metavar=metavar, help=f"{takers} (default {default!r})")


def method_params(args: argparse.Namespace, methods) -> dict[str, dict]:
    """Per method, the parameters the user set on the command line."""
    takers = method_fields()
    out: dict[str, dict] = {m: {} for m in methods}
    for name, ms in takers.items():
        value = getattr(args, "m_" + name, None)
        if value is None:
            continue
        if not any(m in methods for m in ms):
            raise ValueError(f"--{name.replace('_', '-')} belongs to {ms}, none of which is being run")
        for m in ms:
            if m in out:
                out[m][name] = value
    return {m: p for m, p in out.items() if p}


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (height x width), e.g. 392x518."""
    try:
        return _parse_pair(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from e
