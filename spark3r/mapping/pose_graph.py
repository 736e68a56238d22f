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

Optimisation: incremental iSAM2 after every window and after a loop (cost bounded by the part of
the Bayes tree the new factors touch, not the map's size); only a segment merge (a removed
anchor, rare) runs a batch Levenberg-Marquardt over the whole graph and restarts iSAM2 from it.
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
        self._isam = gtsam.ISAM2(self._params())
        self._values: dict[int, Sim3] = {}          # latest estimate of every node
        self._factors: list[FactorRecord] = []
        self._anchors: dict[int, Sim3] = {}          # node -> anchored pose (one per live segment)
        self._segment_of: dict[int, int] = {}        # node -> segment id
        self._segment_parent: dict[int, int] = {}    # union-find over segments
        self._reset_pending()
        self.last_optimisation_s = 0.0
        self.optimisations = 0

    @staticmethod
    def _params() -> "gtsam.ISAM2Params":
        p = gtsam.ISAM2Params()
        p.setRelinearizeThreshold(0.01)
        p.relinearizeSkip = 10  # gtsam's default: relinearisation checks are not free on a long graph
        return p

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
        self._pending_values.insert(key, to_gtsam(initial))
        if anchor:
            self._anchors[key] = initial
            self._pending_graph.add(gtsam.PriorFactorSimilarity3(key, to_gtsam(initial), gtsam.noiseModel.Isotropic.Sigma(7, ANCHOR_SIGMA)))

    def add_between(self, record: FactorRecord) -> None:
        for k in (record.i, record.j):
            if k not in self._values:
                raise KeyError(f"pose graph has no node {k}")
        self._factors.append(record)
        self._pending_graph.add(gtsam.BetweenFactorSimilarity3(record.i, record.j, to_gtsam(record.measured),
                                                               _noise(record.kind, record.sigmas)))

    def merge_segments(self, key_a: int, key_b: int) -> bool:
        """A verified link joins the segments of two nodes: the younger segment (higher id)
        loses its anchor. Returns True if two different segments were merged; the caller then
        adds the link and calls :meth:`optimise_all` (which rebuilds iSAM2 without the anchor)."""
        a, b = self.segment(key_a), self.segment(key_b)
        if a == b:
            return False
        keep, drop = min(a, b), max(a, b)
        self._segment_parent[drop] = keep
        for node in [n for n in self._anchors if self._segment_of[n] == drop]:
            del self._anchors[node]
        return True

    # ------------------------------------------------------------------ optimisation

    def update(self) -> dict[int, Sim3]:
        """Incremental step with everything added since the last call. Returns the new estimates
        of the nodes the new factors touch (the ones a caller needs to refresh)."""
        if self._pending_graph.size() == 0 and self._pending_values.size() == 0:
            return {}
        t0 = time.perf_counter()
        touched = set(self._pending_values.keys())
        for k in range(self._pending_graph.size()):
            touched.update(self._pending_graph.at(k).keys())
        self._isam.update(self._pending_graph, self._pending_values)
        self._reset_pending()
        estimate = {int(key): from_gtsam(self._isam.calculateEstimateSimilarity3(key)) for key in touched}
        self._values.update(estimate)
        self.last_optimisation_s = time.perf_counter() - t0
        self.optimisations += 1
        return estimate

    def _reset_pending(self) -> None:
        self._pending_graph = gtsam.NonlinearFactorGraph()
        self._pending_values = gtsam.Values()

    def update_after_loop(self, keys: Optional[Iterable[int]] = None, iterations: int = 2) -> dict[int, Sim3]:
        """Incremental step with a new loop factor: iSAM2 re-eliminates only the part of the
        Bayes tree between the loop's ends; a few extra iterations let its relinearisation
        follow a large correction. Returns the new estimates of ``keys`` (the nodes the loop
        spans; None = all); the others are read back by :meth:`refresh`."""
        t0 = time.perf_counter()
        self.update()
        for _ in range(iterations):
            self._isam.update()
        estimate = self._read(keys)
        self.last_optimisation_s = time.perf_counter() - t0
        return estimate

    def refresh(self) -> dict[int, Sim3]:
        """Every node's current estimate (O(nodes); for the end of a run or a save)."""
        return self._read(None)

    def _read(self, keys: Optional[Iterable[int]]) -> dict[int, Sim3]:
        if keys is None:
            values = self._isam.calculateEstimate()
            estimate = {k: from_gtsam(values.atSimilarity3(k)) for k in self._values}
        else:
            estimate = {int(k): from_gtsam(self._isam.calculateEstimateSimilarity3(int(k))) for k in keys if k in self._values}
        self._values.update(estimate)
        return estimate

    def optimise_all(self, max_iterations: int = 50) -> dict[int, Sim3]:
        """Batch Levenberg-Marquardt over the whole graph (after a loop or a segment merge), then
        iSAM2 restarts from the optimum. Returns every node's estimate."""
        t0 = time.perf_counter()
        graph, initial = self._full_graph()
        params = gtsam.LevenbergMarquardtParams()
        params.setMaxIterations(max_iterations)
        result = gtsam.LevenbergMarquardtOptimizer(graph, initial, params).optimize()
        self._values = {k: from_gtsam(result.atSimilarity3(k)) for k in self._values}
        self._restart_isam(graph, result)
        self.last_optimisation_s = time.perf_counter() - t0
        self.optimisations += 1
        return dict(self._values)

    def _full_graph(self):
        graph = gtsam.NonlinearFactorGraph()
        initial = gtsam.Values()
        for key, value in self._values.items():
            initial.insert(key, to_gtsam(value))
        for key, pose in self._anchors.items():
            graph.add(gtsam.PriorFactorSimilarity3(key, to_gtsam(pose), gtsam.noiseModel.Isotropic.Sigma(7, ANCHOR_SIGMA)))
        for r in self._factors:
            graph.add(gtsam.BetweenFactorSimilarity3(r.i, r.j, to_gtsam(r.measured), _noise(r.kind, r.sigmas)))
        return graph, initial

    def _restart_isam(self, graph, values) -> None:
        self._isam = gtsam.ISAM2(self._params())
        self._isam.update(graph, values)
        self._reset_pending()

    def estimate(self, key: int) -> Sim3:
        return self._values[key]

    def estimates(self, keys: Optional[Iterable[int]] = None) -> dict[int, Sim3]:
        if keys is None:
            return dict(self._values)
        return {k: self._values[k] for k in keys if k in self._values}

    def marginal_covariance(self, key: int) -> Optional[np.ndarray]:
        """7x7 marginal covariance of a node in its tangent space (rotation, translation,
        log-scale), or None if iSAM2 cannot give one yet."""
        try:
            return np.asarray(self._isam.marginalCovariance(key))
        except Exception:
            return None
