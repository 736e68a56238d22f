"""Synthetic benchmark sequences with ground truth, and loading ground truth back.

:func:`write_benchmark` renders a sequence with ``spark3r.data.synthetic`` and writes, under one
directory: ``sequence.bag/`` (rosbag2 mcap: images, CameraInfo, /tf_static), ``tum/`` (TUM RGB-D
folder: rgb, 16-bit depth, groundtruth.txt, intrinsics.txt) and ``reference.ply`` (the true
surface points seen by the sequence, world frame, for cloud accuracy/completeness).

:func:`load_tum_ground_truth` reads such a TUM folder back into the fields the mapper's
ground-truth test double needs (``images, depth, K, c2w, stamps_ns``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_POINTS = 200_000


@dataclass(frozen=True)
class GroundTruthSequence:
    images: np.ndarray     # uint8 [N, H, W, 3]
    depth: np.ndarray      # float32 [N, H, W] metres (0 = unknown)
    K: np.ndarray          # float64 [3, 3]
    c2w: np.ndarray        # float64 [N, 4, 4]
    stamps_ns: np.ndarray  # int64 [N]


def reference_cloud(seq, max_points: int = REFERENCE_POINTS, seed: int = 0) -> np.ndarray:
    """World points of every frame's true depth, evenly subsampled to ``max_points``."""
    pts = np.concatenate([seq.world_points(i).reshape(-1, 3) for i in range(len(seq))])
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(seed).choice(len(pts), max_points, replace=False)]
    return pts.astype(np.float32)


def write_benchmark(out_dir, num_frames: int = 40, height: int = 120, width: int = 160, seed: int = 0,
                    trajectory: str = "orbit", fps: float = 10.0, storage: str = "mcap", compressed: bool = False,
                    overwrite: bool = False) -> dict[str, Path]:
    """Render and write a benchmark sequence; returns ``{"bag", "tum", "reference"}`` paths."""
    from spark3r.data.bag_io import write_sequence_bag
    from spark3r.data.io import atomic_directory, write_ply, write_tum_rgbd_folder
    from spark3r.data.synthetic import render_sequence

    seq = render_sequence(num_frames=num_frames, height=height, width=width, seed=seed, trajectory=trajectory, fps=fps)
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as staging:
        staging.mkdir()
        write_sequence_bag(seq, staging / "sequence.bag", storage=storage, compressed=compressed)
        write_tum_rgbd_folder(seq, staging / "tum")
        xyz = reference_cloud(seq, seed=seed)
        write_ply(staging / "reference.ply", xyz, None)
    return {"bag": out / "sequence.bag", "tum": out / "tum", "reference": out / "reference.ply"}


def load_tum_ground_truth(path, max_diff_ns: int = 20_000_000) -> GroundTruthSequence:
    """Images, depth, intrinsics and poses of a TUM RGB-D folder with ``groundtruth.txt`` and
    ``intrinsics.txt``; each colour image gets the ground-truth pose with the nearest stamp
    (within ``max_diff_ns``)."""
    from spark3r.data.io import iter_tum_rgbd_folder, read_tum_intrinsics, read_tum_trajectory

    root = Path(path)
    intrinsics = read_tum_intrinsics(root)
    if intrinsics is None:
        raise ValueError(f"{root} has no intrinsics.txt; the ground-truth backbone needs the camera intrinsics")
    gt_stamps, gt_poses = read_tum_trajectory(root / "groundtruth.txt")
    if len(gt_stamps) == 0:
        raise ValueError(f"{root / 'groundtruth.txt'} has no poses")
    frames = list(iter_tum_rgbd_folder(root, with_depth=True))
    if not frames:
        raise ValueError(f"{root} has no frames")
    images, depth, poses, stamps = [], [], [], []
    for f in frames:
        k = int(np.argmin(np.abs(gt_stamps - f.stamp_ns)))
        if abs(int(gt_stamps[k]) - f.stamp_ns) > max_diff_ns:
            raise ValueError(f"{root}: no ground-truth pose within {max_diff_ns / 1e6:g} ms of image stamp {f.stamp_ns}")
        images.append(f.rgb)
        depth.append(f.depth if f.depth is not None else np.zeros(f.rgb.shape[:2], np.float32))
        poses.append(gt_poses[k])
        stamps.append(f.stamp_ns)
    return GroundTruthSequence(np.stack(images), np.stack(depth).astype(np.float32), intrinsics[0],
                               np.stack(poses), np.array(stamps, dtype=np.int64))


DESCRIPTION = """Render a synthetic benchmark sequence with ground truth and write, under --out:
sequence.bag/ (rosbag2: Image or CompressedImage, CameraInfo, /tf_static), tum/ (TUM RGB-D folder:
rgb/, 16-bit depth/, groundtruth.txt, intrinsics.txt) and reference.ply (true surface points).
Then: spark3r map OUT/sequence.bag --out RUN ...; spark3r eval RUN --gt OUT/tum."""


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m spark3r.offline.benchmark", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder to create (must not exist unless --overwrite)")
    p.add_argument("--frames", type=int, default=40, help="number of frames (default 40)")
    p.add_argument("--height", type=int, default=120, help="image height in pixels (default 120)")
    p.add_argument("--width", type=int, default=160, help="image width in pixels (default 160)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene and trajectory (default 0)")
    p.add_argument("--trajectory", default="orbit", choices=("orbit", "forward", "static"),
                   help="camera motion: orbit the room, move forward, or stand still (default orbit)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of the stamps (default 10)")
    p.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"), help="rosbag2 storage (default mcap)")
    p.add_argument("--compressed", action="store_true", help="CompressedImage (jpeg) instead of raw Image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv=None) -> int:
    """``python -m spark3r.offline.benchmark --out DIR``: write a benchmark sequence (bag + TUM + reference)."""
    import sys

    p = build_parser()
    args = p.parse_args(argv)
    try:
        paths = write_benchmark(args.out, num_frames=args.frames, height=args.height, width=args.width, seed=args.seed,
                                trajectory=args.trajectory, fps=args.fps, storage=args.storage,
                                compressed=args.compressed, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
