"""Cost of the SLAM back end over a long keyframe stream, with a cheap test double instead of a
model (so the numbers are the back end's: store, pose graph, loop search and verification
bookkeeping, map cache), printed as JSON by ``spark3r bench --stream --backend [--keyframes N] [--bucket B]``.

The stream is the synthetic loop sequence (:func:`spark3r.mapping.testing.loop_sequence`) played
lap after lap with increasing stamps, every frame a keyframe, so loops are found on every lap.
Reported per bucket of keyframes: mean and max back-end seconds per keyframe (wall time of the
mapper's window processing minus the backbone's, the voxel map's and the front end's window
alignment), those two apart (the voxel map's cost follows its size, which ``max_map_points``
caps; the alignment's is per window), process RSS, graph size, loops. The claim to
check: per-keyframe cost does not grow linearly with the map; memory is flat apart from the
(capped) voxel map.
"""
from __future__ import annotations

import resource
import time
from typing import Optional

import numpy as np


def _rss_mib() -> float:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Timed:
    """Wraps a callable and adds up the seconds spent inside it."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


class _TimedBackbone:
    """Wraps a backbone and adds up the seconds spent inside it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def predict(self, window):
        t0 = time.perf_counter()
        try:
            return self.inner.predict(window)
        finally:
            self.seconds += time.perf_counter() - t0

    def forget(self, ids):
        self.inner.forget(ids)

    def reset(self):
        self.inner.reset()


def backend_stream_benchmark(num_keyframes: int = 2000, bucket: int = 200, frames_per_lap: int = 60,
                             height: int = 48, width: int = 64, params: Optional[dict] = None, seed: int = 0) -> dict:
    """Run the mapper with the back end over ``num_keyframes`` keyframes; returns a JSON-able
    report (see the module docstring). ``params``: flat mapper parameters overriding the
    defaults (window 6 / stride 3, every frame a keyframe)."""
    from ..mapping import Frame, Mapper, MapperConfig
    from ..mapping.testing import DriftingBackbone, loop_sequence

    if num_keyframes < 2 * bucket or bucket < 10:
        raise ValueError(f"need num_keyframes >= 2 * bucket and bucket >= 10, got {num_keyframes} and {bucket}")
    lap = loop_sequence(num_frames=frames_per_lap, frames_per_lap=float(frames_per_lap), height=height, width=width, seed=seed)
    idx = np.arange(num_keyframes) % frames_per_lap
    stamps = lap.stamps_ns[0] + np.arange(num_keyframes, dtype=np.int64) * int(1e9 / lap.fps)
    stream = type(lap)(**{**lap.__dict__, "images": lap.images[idx], "depth": lap.depth[idx], "c2w": lap.c2w[idx],
                          "base_c2w": lap.base_c2w[idx], "stamps_ns": stamps})
    values = {"min_parallax_px": 0.0, "min_time_gap_s": 0.0, "window_size": 6, "window_stride": 3, "voxel_size": 0.05,
              "max_map_points": 200_000}
    values.update(params or {})
    config = MapperConfig.from_flat(values)
    backbone = _TimedBackbone(DriftingBackbone(stream, seed=seed + 1))
    mapper = Mapper(config, backbone, base_to_camera=stream.base_to_camera)
    # The voxel map (the capped cache) and the front end's window alignment are timed apart from
    # the back end proper.
    map_insert, map_remove = _Timed(mapper.voxel_map.insert), _Timed(mapper.voxel_map.remove)
    mapper.voxel_map.insert, mapper.voxel_map.remove = map_insert, map_remove
    align = _Timed(mapper._align)
    mapper._align = align
    rows = []
    bucket_cost, bucket_max, bucket_keyframes, bucket_map, bucket_align = 0.0, 0.0, 0, 0.0, 0.0
    rss_start = _rss_mib()
    t_start = time.perf_counter()
    for i in range(num_keyframes):
        mapper.offer(Frame(stream.images[i], int(stream.stamps_ns[i]), stream.K))
        while True:
            before_backbone, before_map, before_align = backbone.seconds, map_insert.seconds + map_remove.seconds, align.seconds
            t0 = time.perf_counter()
            result = mapper.process_pending()
            if result is None:
                break
            in_map = map_insert.seconds + map_remove.seconds - before_map
            in_align = align.seconds - before_align
            cost = (time.perf_counter() - t0) - (backbone.seconds - before_backbone) - in_map - in_align
            bucket_align += in_align
            per_keyframe = cost / max(len(result.keyframes), 1)
            bucket_cost += cost
            bucket_map += in_map
            bucket_max = max(bucket_max, per_keyframe)
            bucket_keyframes += len(result.keyframes)
        if (i + 1) % bucket == 0:
            st = mapper.stats
            rows.append({"keyframes": i + 1, "backend_s_per_keyframe_mean": bucket_cost / max(bucket_keyframes, 1),
                         "backend_s_per_keyframe_max": bucket_max,
                         "voxel_map_s_per_keyframe_mean": bucket_map / max(bucket_keyframes, 1),
                         "alignment_s_per_keyframe_mean": bucket_align / max(bucket_keyframes, 1), "rss_mib": _rss_mib(), "graph_nodes": st.graph_nodes,
                         "graph_factors": st.graph_factors, "loops_accepted": st.loops_accepted,
                         "loops_rejected": st.loops_rejected, "map_points": st.map_points, "store_spilled": st.store_spilled,
                         "last_optimisation_s": st.last_optimisation_s})
            bucket_cost, bucket_max, bucket_keyframes, bucket_map, bucket_align = 0.0, 0.0, 0, 0.0, 0.0
    wall = time.perf_counter() - t_start
    mapper.flush()  # the tail of the stream (not timed)
    st = mapper.stats
    first, last = rows[0]["backend_s_per_keyframe_mean"], rows[-1]["backend_s_per_keyframe_mean"]
    keyframes_ratio = rows[-1]["keyframes"] / rows[0]["keyframes"]
    return {
        "benchmark": "backend_stream",
        "backbone": "DriftingBackbone (test double; backbone time excluded)",
        "keyframes": num_keyframes, "bucket": bucket, "image_hw": [height, width], "frames_per_lap": frames_per_lap,
        "mapper_params": values,
        "wall_s": wall,
        "rss_mib_start": rss_start,
        "buckets": rows,
        "cost_growth": {"last_over_first_bucket": last / first if first > 0 else None, "keyframes_ratio": keyframes_ratio,
                        "linear_would_be": keyframes_ratio},
        "rss_growth_mib": rows[-1]["rss_mib"] - rows[0]["rss_mib"],
        "totals": {"windows": st.windows, "loops_accepted": st.loops_accepted, "loops_rejected": st.loops_rejected,
                   "graph_nodes": st.graph_nodes, "graph_factors": st.graph_factors, "store_spilled": st.store_spilled,
                   "max_optimisation_s": st.max_optimisation_s, "tracking_state": st.tracking_state},
    }
