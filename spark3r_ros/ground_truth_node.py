"""TEST DOUBLE: the mapping node with a ground-truth backbone for a synthetic scene.

    python -m spark3r_ros.ground_truth_node --frames 48 --seed 7 [--slow-seconds 1] --ros-args -p ...

This is the real :class:`spark3r_ros.mapping_node.MappingNode` (same parameters, topics, TF,
services, threads); only the backbone is replaced by
:class:`spark3r.mapping.testing.GroundTruthBackbone`, which answers each window with the
ground truth of the synthetic sequence that ``python -m spark3r_ros.synthetic_camera`` streams
with the same scene arguments, in a random similarity frame per window. It exists for the tests
and the demo (exact geometry, no model weights, fast on a CPU); it maps nothing else.

Knobs for overload / bad-output tests: ``--slow-seconds`` sleeps in every backbone call (a slow
model), ``--nan-depth-fraction`` puts NaN into that share of every predicted depth map,
``--spoil-depth-after N`` scrambles the depth of every window after the first N (by random factors
of 0.2-5 per pixel), so those windows cannot be aligned to the map (tracking lost).
``--drifting`` answers with :class:`spark3r.mapping.testing.DriftingBackbone` instead (scale and
heading creep per window, depth noise, place descriptors): stitching drifts as with a real model,
so the back end's loop closure has something to correct (use with ``--trajectory loop``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from spark3r_ros.synthetic_camera import add_scene_arguments, render_scene


class TestDoubleBackbone:
    """Wraps the ground-truth backbone: names it as a test double (diagnostics, logs), and
    optionally sleeps ``delay_s`` per window and/or writes NaN into part of the depth."""

    name = "ground-truth-synthetic (TEST DOUBLE)"

    def __init__(self, inner, delay_s: float = 0.0, nan_depth_fraction: float = 0.0, seed: int = 0,
                 spoil_depth_after: int = -1):
        self.inner = inner
        self.delay_s = float(delay_s)
        self.nan_depth_fraction = float(nan_depth_fraction)
        self.spoil_depth_after = int(spoil_depth_after)
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def predict(self, window):
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        pred = self.inner.predict(window)
        self.calls += 1
        if 0 <= self.spoil_depth_after < self.calls:
            pred.depth = (pred.depth * self.rng.uniform(0.2, 5.0, size=pred.depth.shape)).astype(np.float32)
        if self.nan_depth_fraction > 0:
            pred.depth = np.where(self.rng.random(pred.depth.shape) < self.nan_depth_fraction, np.nan, pred.depth)
        return pred

    def forget(self, keyframe_ids) -> None:
        self.inner.forget(keyframe_ids)

    def reset(self) -> None:
        self.inner.reset()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_arguments(parser)
    parser.add_argument("--backbone-seed", type=int, default=11, help="seed of the per-window random similarities")
    parser.add_argument("--slow-seconds", type=float, default=0.0, help="sleep this long in every backbone call")
    parser.add_argument("--nan-depth-fraction", type=float, default=0.0, help="share of depth pixels set to NaN")
    parser.add_argument("--spoil-depth-after", type=int, default=-1,
                        help="scramble the depth of every window after this many (-1 = never): tracking is lost")
    parser.add_argument("--drifting", action="store_true",
                        help="the drifting TEST DOUBLE (systematic per-window errors, place descriptors) for loop closure")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything from --ros-args on belongs to rclpy.
    split = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    args, unknown = parse_args(argv[:split])
    if unknown:
        print(f"unknown arguments {unknown} (ROS arguments go after --ros-args)", file=sys.stderr)
        return 2
    seq = render_scene(args)

    def factory(backbone_config, mapper_config):
        from spark3r.mapping.testing import DriftingBackbone, GroundTruthBackbone

        inner = (DriftingBackbone if args.drifting else GroundTruthBackbone)(seq, seed=args.backbone_seed)
        backbone = TestDoubleBackbone(inner, args.slow_seconds, args.nan_depth_fraction, seed=args.backbone_seed,
                                      spoil_depth_after=args.spoil_depth_after)
        if args.drifting:
            backbone.name = "drifting-synthetic (TEST DOUBLE)"
        return backbone

    from spark3r_ros.mapping_node import main as node_main

    return node_main(["ground_truth_node", *argv[split:]], backbone_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
