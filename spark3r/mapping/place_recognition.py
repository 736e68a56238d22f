"""Place recognition from the backbone's own tokens: a global descriptor per keyframe and a
search over the keyframe store. No extra network.

:func:`place_descriptor` is a pure function of one frame's patch tokens ``[h, w, C]`` (the
encoder's patch embeddings or any per-patch feature): tokens are centred on the frame's mean
token (what every patch shares says nothing about *where* the camera is), pooled into a coarse
``grid x grid`` spatial layout (two views of a place agree on what is left, right, up, down),
power-normalised (signed square root: a few strong patches must not dominate) and scaled to unit
length, so the dot product of two descriptors is their cosine similarity in [-1, 1]. Wide tokens
(a ViT's 1024 channels) are first projected to ``max_channels`` by a fixed seeded random matrix
(Johnson-Lindenstrauss: cosines are kept approximately), so a descriptor stays a few KB.

:func:`frame_descriptors` applies it to a window's encoder tokens ``[S, N, C]`` (what
``BackboneModel.encode_patches`` returns; leading non-patch tokens such as a CLS are skipped).

:func:`image_tokens` makes such tokens from a raw image (small colour patches); it is what the
test doubles use, and a fallback for backbones that expose no tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

DESCRIPTOR_GRID = 4
DESCRIPTOR_MAX_CHANNELS = 256


def _projection(channels: int, out: int) -> np.ndarray:
    """The fixed ``[channels, out]`` random projection (same matrix in every process)."""
    return np.random.default_rng([channels, out, 0x5EED]).normal(size=(channels, out)) / np.sqrt(out)


def place_descriptor(tokens: np.ndarray, grid: int = DESCRIPTOR_GRID, max_channels: int = DESCRIPTOR_MAX_CHANNELS) -> np.ndarray:
    """Unit-length float32 descriptor ``[gh * gw * min(C, max_channels)]`` of one frame's
    tokens ``[h, w, C]``, pooled on ``gh x gw = min(grid, h) x min(grid, w)`` cells (a tiny
    network input has fewer patches than cells)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.ndim != 3 or min(tokens.shape) < 1:
        raise ValueError(f"place_descriptor expects tokens [h, w, C] with h, w, C >= 1, got {tokens.shape}")
    if not np.all(np.isfinite(tokens)):
        raise ValueError("place_descriptor: tokens contain NaN or inf")
    h, w, C = tokens.shape
    flat = tokens.reshape(-1, C)
    if C > max_channels:
        flat = flat @ _projection(C, max_channels)
    centred = flat - flat.mean(axis=0)
    gh, gw = min(grid, h), min(grid, w)
    rows = (np.arange(h) * gh) // h
    cols = (np.arange(w) * gw) // w
    cell = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    assign = np.zeros((gh * gw, h * w))
    assign[cell, np.arange(h * w)] = 1.0
    pooled = (assign @ centred) / assign.sum(axis=1, keepdims=True)
    d = (np.sign(pooled) * np.sqrt(np.abs(pooled))).reshape(-1)
    norm = np.linalg.norm(d)
    if norm <= 0:
        return np.zeros(d.shape, np.float32)  # a uniform frame matches nothing
    return (d / norm).astype(np.float32)


def frame_descriptors(tokens: np.ndarray, grid_hw: tuple[int, int], grid: int = DESCRIPTOR_GRID) -> np.ndarray:
    """``[S, D]`` descriptors of a window's per-frame encoder tokens ``[S, N, C]`` whose last
    ``grid_hw[0] * grid_hw[1]`` tokens are the patch grid in raster order."""
    tokens = np.asarray(tokens)
    gh, gw = grid_hw
    if tokens.ndim != 3 or tokens.shape[1] < gh * gw:
        raise ValueError(f"frame_descriptors expects tokens [S, N >= {gh * gw}, C], got {tokens.shape}")
    patches = tokens[:, tokens.shape[1] - gh * gw:, :]
    return np.stack([place_descriptor(p.reshape(gh, gw, -1), grid) for p in patches])


def image_tokens(image: np.ndarray, patches: tuple[int, int] = (12, 16), patch: int = 4) -> np.ndarray:
    """Per-patch colour tokens ``[ph, pw, 3 * patch * patch]`` of an RGB uint8 image resized to
    ``patches * patch`` pixels (raw pixel features, scaled to [0, 1])."""
    ph, pw = patches
    small = cv2.resize(np.asarray(image), (pw * patch, ph * patch), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
    return small.reshape(ph, patch, pw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(ph, pw, -1)


@dataclass(frozen=True)
class PlaceMatch:
    keyframe_id: int
    score: float     # cosine similarity


def search_places(query: np.ndarray, ids: np.ndarray, descriptors: np.ndarray, allowed: Optional[np.ndarray] = None,
                  min_score: float = 0.0, top_k: int = 3, suppress_radius: int = 2,
                  tie_tolerance: float = 0.02) -> list[PlaceMatch]:
    """The best ``top_k`` stored keyframes for ``query`` with a score >= ``min_score``.

    ``ids [M]``/``descriptors [M, D]``: the store's (oldest first); ``allowed [M]`` bool masks the
    rows that may match (e.g. not the recent keyframes). Matches closer than ``suppress_radius``
    rows to a better match are dropped (neighbouring keyframes of one place are one candidate).
    Scores within ``tie_tolerance`` count as equal and the newer keyframe wins: a place seen on
    several earlier visits is linked to the latest one (a short loop, cheap to optimise).
    Cost: one matrix-vector product over the store.
    """
    if len(ids) == 0:
        return []
    q = np.asarray(query, np.float32).reshape(-1)
    if q.shape[0] != descriptors.shape[1]:
        raise ValueError(f"query descriptor has {q.shape[0]} dimensions, the store holds {descriptors.shape[1]}")
    scores = descriptors @ q
    ok = scores >= min_score
    if allowed is not None:
        ok &= allowed
    rows = np.flatnonzero(ok)
    bins = np.floor(scores[rows] / tie_tolerance) if tie_tolerance > 0 else scores[rows]
    rows = rows[np.lexsort((-rows, -bins))]
    picked: list[int] = []
    for r in rows:
        if all(abs(int(r) - p) > suppress_radius for p in picked):
            picked.append(int(r))
            if len(picked) == top_k:
                break
    return [PlaceMatch(int(ids[r]), float(scores[r])) for r in picked]
