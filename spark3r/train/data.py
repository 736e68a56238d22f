"""The training data stream: batch ``i`` is a pure function of ``(data_seed, i)``.

That makes the stream's state a single integer (the next batch index), so a resumed run sees
exactly the batches it would have seen, whatever the number of workers. Workers are separate
processes that only run numpy (the renderer), each producing every ``num_workers``-th batch into
its own bounded queue; the trainer reads the queues round-robin, so order is fixed.

This module imports no torch: spawned workers start fast and light.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np

from spark3r.data.procedural import MOTIONS, render_procedural, train_seed

PATCH = 14


@dataclass(frozen=True)
class DataConfig:
    """What the training stream draws per batch (all sizes in pixels)."""

    data_seed: int = 0  # the stream: batch i depends only on (data_seed, i)
    batch_size: int = 1  # sequences per batch (same frame count and size within a batch)
    min_frames: int = 2  # frames per sequence, drawn uniformly in [min_frames, max_frames]
    max_frames: int = 24
    widths: tuple[int, ...] = (126, 140, 154)  # network input widths (multiples of 14)
    min_aspect: float = 0.5  # height / width drawn in [min_aspect, max_aspect], rounded to 14 px
    max_aspect: float = 1.0
    motions: tuple[str, ...] = ()  # camera motions to draw from (a curriculum); () = each scene's own draw

    def __post_init__(self) -> None:
        bad = [m for m in self.motions if m not in MOTIONS]
        if bad or len(set(self.motions)) != len(self.motions):
            raise ValueError(f"motions must be distinct names from {MOTIONS}, got {self.motions!r}")
        if not isinstance(self.data_seed, int) or self.data_seed < 0:
            raise ValueError(f"data_seed must be an integer >= 0, got {self.data_seed!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size must be an integer in [1, 256], got {self.batch_size!r}")
        if not (isinstance(self.min_frames, int) and isinstance(self.max_frames, int) and 1 <= self.min_frames <= self.max_frames <= 256):
            raise ValueError(f"frames must satisfy 1 <= min_frames <= max_frames <= 256, got {self.min_frames}..{self.max_frames}")
        if not self.widths or any((not isinstance(w, int)) or w < 2 * PATCH or w % PATCH for w in self.widths):
            raise ValueError(f"widths must be integers >= {2 * PATCH} and multiples of {PATCH}, got {self.widths!r}")
        if not 0.2 <= self.min_aspect <= self.max_aspect <= 2.0:
            raise ValueError(f"aspect range must satisfy 0.2 <= min_aspect <= max_aspect <= 2, got {self.min_aspect}..{self.max_aspect}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["motions"] = list(self.motions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["motions"] = tuple(d.get("motions", ()))
        return cls(**d)


def batch_layout(cfg: DataConfig, index: int) -> tuple[int, int, int, list[int]]:
    """(frames, height, width, scene seeds) of batch ``index``."""
    rng = np.random.default_rng([cfg.data_seed, int(index), 0x5EED])
    frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    width = int(rng.choice(cfg.widths))
    height = max(PATCH, int(round(width * rng.uniform(cfg.min_aspect, cfg.max_aspect) / PATCH)) * PATCH)
    seeds = [train_seed(rng) for _ in range(cfg.batch_size)]
    return frames, height, width, seeds


def batch_motions(cfg: DataConfig, index: int) -> list:
    """The camera motion of each sequence of batch ``index`` (None = the scene's own draw)."""
    if not cfg.motions:
        return [None] * cfg.batch_size
    rng = np.random.default_rng([cfg.data_seed, int(index), 0x3071])
    return [str(rng.choice(cfg.motions)) for _ in range(cfg.batch_size)]


def render_batch(cfg: DataConfig, index: int) -> dict:
    """Batch ``index`` as numpy arrays: ``images`` uint8 [B,S,H,W,3], ``depth`` float32
    [B,S,H,W] (metric z-depth), ``c2w`` float64 [B,S,4,4] (OpenCV), ``K`` float64 [B,S,3,3]."""
    frames, height, width, seeds = batch_layout(cfg, index)
    seqs = [render_procedural(seed, frames, height, width, motion=motion)
            for seed, motion in zip(seeds, batch_motions(cfg, index))]
    return {
        "index": int(index),
        "seeds": seeds,
        "images": np.stack([s.images for s in seqs]),
        "depth": np.stack([s.depth for s in seqs]),
        "c2w": np.stack([s.c2w for s in seqs]),
        "K": np.stack([np.repeat(s.K[None], frames, axis=0) for s in seqs]),
    }


def _worker(cfg_dict: dict, start: int, stride: int, out: "mp.Queue", parent: int) -> None:
    """Produce batches start, start + stride, ... into ``out`` until the parent goes away."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = DataConfig.from_dict(cfg_dict)
    index = start
    while True:
        batch = render_batch(cfg, index)
        while True:
            try:
                out.put(batch, timeout=5.0)
                break
            except queue.Full:
                if os.getppid() != parent:  # orphaned: the trainer died
                    return
        index += stride


class BatchStream:
    """Iterator over batches ``start, start + 1, ...`` rendered by ``num_workers`` processes
    (0 = render in the calling process). ``close()`` stops the workers."""

    def __init__(self, cfg: DataConfig, start: int, num_workers: int = 1, prefetch: int = 2) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.cfg = cfg
        self.next_index = int(start)
        self._first = int(start)
        self._procs: list = []
        self._queues: list = []
        if num_workers:
            ctx = mp.get_context("spawn")
            for k in range(num_workers):
                q = ctx.Queue(maxsize=max(1, prefetch))
                p = ctx.Process(target=_worker, args=(cfg.to_dict(), start + k, num_workers, q, os.getpid()),
                                daemon=True, name=f"spark3r-data-{k}")
                p.start()
                self._procs.append(p)
                self._queues.append(q)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if not self._queues:
            batch = render_batch(self.cfg, self.next_index)
        else:
            batch = self._get((self.next_index - self._first) % len(self._queues))
        if batch["index"] != self.next_index:
            raise RuntimeError(f"data stream out of order: expected batch {self.next_index}, got {batch['index']}")
        self.next_index += 1
        return batch

    def _get(self, k: int) -> dict:
        while True:
            try:
                return self._queues[k].get(timeout=10.0)
            except queue.Empty:
                if not self._procs[k].is_alive():
                    raise RuntimeError(f"data worker {k} died (exit code {self._procs[k].exitcode})") from None

    def close(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(timeout=5.0)
        self._procs, self._queues = [], []

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
