"""Sim(3) pose graph over keyframes (gtsam): one ``Similarity3`` node per keyframe (its
``local -> map`` pose), ``BetweenFactorSimilarity3`` constraints from windows and loops.

Sim(3) and not SE(3): a monocular, scale-free model's unit drifts from window to window, so the
optimiser must be able to rescale a keyframe's local points.

Conventions: :class:`~spark3r.mapping.alignment.Sim3` maps ``x -> s R x + t``; gtsam's
``Similarity3(R, t_g, s)`` maps ``x -> s (R x + t_g)``, so ``t_g = t / s`` (converted here and
nowhere else). Tangent order of noise sigmas: rotation (3, rad), translation (3), log-scale (1).

Segments: a graph component with its own anchor (a tight prior on its first node). Tracking
loss starts a new segment; a verified link to an older segment merges the two and drops the
newer anchor, so the link moves the whole newer segment into place.

Optimisation is windowed, so its cost per keyframe does not grow with the map: after a window,
Levenberg-Marquardt over the window's keyframes with every node they are linked to held fixed
(tight priors); after a loop, the same over the loop's span (the keyframes from the candidate to
the current one), which moves the whole span and leaves older keyframes where they are. Only a
segment merge (tracking regained after a loss, rare) optimises the whole graph. (Incremental
iSAM2 was measured too: on a stream that revisits the same places lap after lap its Bayes tree
grows cliques as wide as a lap and its cost per keyframe grows with the map.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional

import gtsam
import numpy as np

from .alignment import Sim3

FACTOR_WINDOW = "window"
FACTOR_LOOP = "loop"
ANCHOR_SIGMA = 1e-6
LOCAL_ITERATIONS = 20


def to_gtsam(T: Sim3) -> "gtsam.Similarity3":
    return gtsam.Similarity3(gtsam.Rot3(np.asarray(T.R, dtype=np.float64)), np.asarray(T.t, dtype=np.float64) / T.scale, float(T.scale))


def from_gtsam(g: "gtsam.Similarity3") -> Sim3:
    s = float(g.scale())
    return Sim3(s, np.asarray(g.rotation().matrix(), dtype=np.float64), s * np.asarray(g.translation(), dtype=np.float64))


@dataclass(frozen=True)
class FactorRecord:
    """A between constraint as data (what sessions save and what a rebuild replays)."""

    i: int
    j: int
    measured: Sim3           # expected ``inverse(T_i) @ T_j``
    sigmas: np.ndarray       # [7] rotation, translation, log-scale
    kind: str                # FACTOR_WINDOW or FACTOR_LOOP


def _noise(kind: str, sigmas: np.ndarray):
    base = gtsam.noiseModel.Diagonal.Sigmas(np.asarray(sigmas, dtype=np.float64))
    if kind == FACTOR_LOOP:
        # A loop has passed the backbone's geometric verification; a robust kernel here would
        # switch off exactly the large-drift loops that matter most.
        return base
    # Huber keeps one bad window from dragging the chain and lets a loop correction spread.
    return gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(1.345), base)


class PoseGraph:
    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._values: dict[int, Sim3] = {}          # current estimate of every node
        self._factors: list[FactorRecord] = []
        self._factors_of: dict[int, list[int]] = {}  # node -> indices into _factors
        self._anchors: dict[int, Sim3] = {}          # node -> anchored pose (one per live segment)
        self._segment_of: dict[int, int] = {}        # node -> segment id
        self._segment_parent: dict[int, int] = {}    # union-find over segments
        self._pending: list[int] = []                # nodes added since the last optimisation
        self._last_problem = None                    # (graph, values, keys) of the last optimisation, for marginals
        self.last_optimisation_s = 0.0
        self.optimisations = 0

    # ------------------------------------------------------------------ building

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: int) -> bool:
        return key in self._values

    @property
    def num_factors(self) -> int:
        return len(self._factors)

    @property
    def factors(self) -> list[FactorRecord]:
        return list(self._factors)

    @property
    def anchors(self) -> list[int]:
        """Anchored nodes (one per live segment)."""
        return list(self._anchors)

    def segment(self, key: int) -> int:
        """The (merged) segment a node belongs to."""
        return self._root(self._segment_of[key])

    def segment_roots(self, count: int) -> np.ndarray:
        """int64 ``[count]``: the merged segment of each segment id ``0..count-1`` (itself if unknown)."""
        out = np.arange(count, dtype=np.int64)
        for s in range(count):
            if s in self._segment_parent:
                out[s] = self._root(s)
        return out

    def _root(self, s: int) -> int:
        while self._segment_parent[s] != s:
            s = self._segment_parent[s]
        return s

    def add_node(self, key: int, initial: Sim3, segment: int, anchor: bool = False) -> None:
        """A new keyframe node. ``anchor``: fix it (the first node of a segment)."""
        if key in self._values:
            raise ValueError(f"pose graph node {key} exists already")
        self._values[key] = initial
        self._segment_of[key] = segment
        self._segment_parent.setdefault(segment, segment)
        self._factors_of[key] = []
        self._pending.append(key)
        if anchor:
            self._anchors[key] = initial

    def add_between(self, record: FactorRecord) -> None:
        for k in (record.i, record.j):
            if k not in self._values:
                raise KeyError(f"pose graph has no node {k}")
        self._factors.append(record)
        index = len(self._factors) - 1
        self._factors_of[record.i].append(index)
        if record.j != record.i:
            self._factors_of[record.j].append(index)

    def merge_segments(self, key_a: int, key_b: int) -> bool:
        """A verified link joins the segments of two nodes: the younger segment (higher id)
        loses its anchor. Returns True if two different segments were merged; the caller then
        adds the link and calls :meth:`optimise_all`."""
        a, b = self.segment(key_a), self.segment(key_b)
        if a == b:
            return False
        keep, drop = min(a, b), max(a, b)
        self._segment_parent[drop] = keep
        for node in [n for n in self._anchors if self._segment_of[n] == drop]:
            del self._anchors[node]
        return True

    # ------------------------------------------------------------------ optimisation

    def update(self, keys: Optional[Iterable[int]] = None) -> dict[int, Sim3]:
        """Optimise ``keys`` (default: the nodes added since the last optimisation) with every
        node they are linked to held fixed. Returns their new estimates. Cost: the number of
        keys and their factors, not the graph's size."""
        keys = list(self._pending) if keys is None else [int(k) for k in keys if k in self._values]
        self._pending = []
        if not keys:
            return {}
        return self._optimise(keys)

    def update_after_loop(self, keys: Iterable[int]) -> dict[int, Sim3]:
        """After a loop factor: optimise the loop's span ``keys`` (from the candidate to the
        current keyframe), older linked nodes held fixed."""
        return self.update(keys)

    def refresh(self) -> dict[int, Sim3]:
        """Every node's current estimate."""
        return dict(self._values)

    def optimise_all(self, max_iterations: int = 50) -> dict[int, Sim3]:
        """Levenberg-Marquardt over the whole graph (after a segment merge). Returns every node's
        estimate."""
        self._pending = []
        return self._optimise(list(self._values), max_iterations)

    def _optimise(self, keys: list[int], max_iterations: int = LOCAL_ITERATIONS) -> dict[int, Sim3]:
        t0 = time.perf_counter()
        inside = set(keys)
        graph = gtsam.NonlinearFactorGraph()
        initial = gtsam.Values()
        fixed: set[int] = set()
        used: set[int] = set()
        for k in keys:
            for index in self._factors_of[k]:
                if index in used:
                    continue
                used.add(index)
                r = self._factors[index]
                fixed.update(n for n in (r.i, r.j) if n not in inside)
                graph.add(gtsam.BetweenFactorSimilarity3(r.i, r.j, to_gtsam(r.measured), _noise(r.kind, r.sigmas)))
        tight = gtsam.noiseModel.Isotropic.Sigma(7, ANCHOR_SIGMA)
        for k in fixed:
            graph.add(gtsam.PriorFactorSimilarity3(k, to_gtsam(self._values[k]), tight))
        for k in inside:
            if k in self._anchors:
                graph.add(gtsam.PriorFactorSimilarity3(k, to_gtsam(self._anchors[k]), tight))
        if not fixed and not any(k in self._anchors for k in inside):
            # A component with neither anchor nor fixed neighbour: hold its oldest node.
            first = min(inside)
            graph.add(gtsam.PriorFactorSimilarity3(first, to_gtsam(self._values[first]), tight))
        for k in inside | fixed:
            initial.insert(k, to_gtsam(self._values[k]))
        params = gtsam.LevenbergMarquardtParams()
        params.setMaxIterations(max_iterations)
        result = gtsam.LevenbergMarquardtOptimizer(graph, initial, params).optimize()
        estimate = {k: from_gtsam(result.atSimilarity3(k)) for k in keys}
        self._values.update(estimate)
        self._last_problem = (graph, result, inside)
        self.last_optimisation_s = time.perf_counter() - t0
        self.optimisations += 1
        return estimate

    def estimate(self, key: int) -> Sim3:
        return self._values[key]

    def estimates(self, keys: Optional[Iterable[int]] = None) -> dict[int, Sim3]:
        if keys is None:
            return dict(self._values)
        return {k: self._values[k] for k in keys if k in self._values}

    def marginal_covariance(self, key: int) -> Optional[np.ndarray]:
        """7x7 covariance of a node in its tangent space (rotation, translation, log-scale) from
        the last optimisation that moved it (relative to the nodes held fixed there), or None."""
        if self._last_problem is None or key not in self._last_problem[2]:
            return None
        graph, result, _ = self._last_problem
        try:
            return np.asarray(gtsam.Marginals(graph, result).marginalCovariance(key))
        except Exception:  # gtsam raises on an indeterminate system
            return None
