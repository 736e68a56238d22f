"""Reports as strict JSON: every report, bench result and schedule spark3r writes goes through
:func:`dumps` / :func:`dump`, so a strict parser (``jq``, browsers, ``json.loads`` with
``parse_constant``) can read it.

Python's ``json`` writes ``NaN`` / ``Infinity`` literals by default, which are not JSON. Here a
non-finite float becomes ``null`` ("no value": an empty statistic, a latency never measured) and
``allow_nan=False`` makes any that slips past the conversion an error instead of a bad file.
NumPy scalars and arrays become plain numbers and lists; tuples become lists.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

import numpy as np


def to_strict(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and NumPy values made plain Python."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: to_strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_strict(value.tolist())
    if isinstance(value, np.generic):
        return to_strict(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text of ``value`` (see module docstring); ``kwargs`` go to :func:`json.dumps`."""
    return json.dumps(to_strict(value), allow_nan=False, **kwargs)


def dump(value: Any, fh: IO[str], **kwargs) -> None:
    fh.write(dumps(value, **kwargs))
