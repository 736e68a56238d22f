"""Helpers for comparing re-implemented backbones with ../shared/golden (rule ``seeded-v1``).

Reusable by every backbone: weight generation from (name, shape), per-tensor tolerance checks
as specified in golden/README.md §5, and loading a case (JSON + safetensors).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from spark3r.seeded import seeded_v1  # the rule itself lives in the package (benchmarks use it too)

__all__ = ["seeded_v1", "seeded_state_dict", "tensor_digest", "GoldenCase", "load_case", "mismatch_report", "deviation"]


def tensor_digest(t: torch.Tensor) -> str:
    """First 16 hex digits of sha256 over little-endian float32 C-order bytes (as in the JSON)."""
    arr = t.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


@dataclass
class GoldenCase:
    name: str
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def entries(self) -> list[list]:
        return self.meta["state_dict"]["entries"]

    def tolerance(self, key: str) -> dict:
        return self.meta["tolerance"]["per_tensor"][key]

    def state_dict(self, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Regenerate the weights: rule entries from seeded-v1, aliases share their source
        tensor, ``default`` entries must be supplied by the caller's model (not generated)."""
        out: dict[str, torch.Tensor] = {}
        for name, shape, kind, *_ in self.entries:
            if skip_prefixes and name.startswith(skip_prefixes):
                continue
            if kind == "rule":
                out[name] = seeded_v1(name, shape)
            elif kind.startswith("alias-of:"):
                out[name] = out[kind.split(":", 1)[1]]
        return out


def load_case(shared: Path, case: str) -> GoldenCase:
    from safetensors.torch import load_file

    base = Path(shared) / "golden"
    meta = json.loads((base / f"{case}.json").read_text())
    tensors = load_file(str(base / f"{case}.safetensors"))
    return GoldenCase(case, meta, tensors)


def mismatch_report(candidate: torch.Tensor, golden: torch.Tensor, tol: float, scale: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if ``|c - g| <= tol * (s + median(s))`` everywhere (s = |g| or the given scale);
    otherwise a one-line description of the worst element."""
    if tuple(candidate.shape) != tuple(golden.shape):
        return f"shape {tuple(candidate.shape)} != golden {tuple(golden.shape)}"
    c = candidate.detach().to(torch.float64).cpu()
    g = golden.detach().to(torch.float64).cpu()
    s = g.abs() if scale is None else scale.to(torch.float64).expand_as(g)
    bound = tol * (s + s.median())
    err = (c - g).abs()
    if not torch.isfinite(c).all():
        return "candidate has non-finite values"
    ratio = err / bound.clamp_min(1e-300)
    worst = float(ratio.max())
    if worst <= 1.0:
        return None
    idx = int(ratio.argmax())
    return f"worst |diff|/bound = {worst:.3g} at flat index {idx} (cand {c.flatten()[idx]:.6g}, golden {g.flatten()[idx]:.6g}, tol {tol:g})"


def deviation(candidate: torch.Tensor, golden: torch.Tensor) -> float:
    """max |c - g| / (|g| + median|g|): the README's metric, in units of tol."""
    c = candidate.detach().to(torch.float64).cpu()
    g = golden.detach().to(torch.float64).cpu()
    s = g.abs()
    return float(((c - g).abs() / (s + s.median()).clamp_min(1e-300)).max())


def seeded_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """seeded-v1 values for every entry of ``model.state_dict()`` (meta models work too); a
    deterministic, non-trivial weight set for tests that do not need the golden files."""
    return {name: seeded_v1(name, t.shape) for name, t in model.state_dict().items()}
