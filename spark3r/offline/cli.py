"""``spark3r map``: ``add_arguments(parser)`` + ``run(args)``, registered in ``spark3r/cli.py``."""
from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path
from typing import Optional


def _parse_value(text: str):
    """``--param name=value``: Python/JSON literals (numbers, true/false, lists), else a string."""
    lowered = {"true": True, "false": False}.get(text.strip().lower())
    if lowered is not None:
        return lowered
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(pairs) -> dict:
    values = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--param expects name=value (a mapper parameter or reduction.<name>), got {pair!r}")
        values[name.strip()] = _parse_value(value)
    return values


HELP = "map a bag, TUM RGB-D folder, image folder or video offline with the node's mapper"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="rosbag2 directory / .mcap / .db3, TUM RGB-D folder, image folder or video")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory when done")
    p.add_argument("--kind", choices=("bag", "tum", "images", "video"), help="input kind (default: detect)")
    p.add_argument("--topic", help="bag image topic (Image or CompressedImage; default: the only one)")
    p.add_argument("--camera-info-topic", help="bag CameraInfo topic (default: the only one, if any)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate for stamps of image folders / videos without stamps")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--backbone", "--model", dest="backbone", default="vggt-1b", help="model preset: vggt-1b, pi3, da3-small, da3-base, da3-large, da3-giant (vggt-tiny, pi3-tiny for tests)")
    p.add_argument("--checkpoint", default="", help="weights file / directory / hub id, or 'seeded' (test weights)")
    p.add_argument("--reduction", default="dense", help="global-attention token reduction (dense, uniform, spark3r, ...)")
    p.add_argument("--reduction-params", default="{}", help="JSON keyword parameters of the reduction method")
    p.add_argument("--reduction-schedule", default="",
                   help="Spark3R key/value schedule JSON file (reduction spark3r; as the node's reduction_schedule)")
    p.add_argument("--cache-max-frames", type=int, default=0,
                   help="patch-embedding cache capacity in keyframes (0 = window_size + window_stride)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--image-width", type=int, default=518, help="network input width, 28-4088 in steps of 14")
    p.add_argument("--ground-truth", type=Path, metavar="TUM_DIR",
                   help="TEST DOUBLE instead of a model: answer windows with this TUM folder's ground truth")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="mapper parameter or reduction method parameter reduction.<name> (same names as the ROS node), "
                        "repeatable, e.g. --param window_size=8 --param reduction.query_keep=1")
    p.add_argument("--save-session", type=Path, metavar="DIR",
                   help="also write a loadable map session (keyframes, poses, graph, descriptors, points) to DIR")
    p.add_argument("--load-session", type=Path, metavar="DIR",
                   help="start from a saved session: new keyframes extend it once relocalized (see --localization-only)")
    p.add_argument("--localization-only", action="store_true",
                   help="with --load-session: only localize in the loaded map, never extend it")
    p.add_argument("--no-progress", action="store_true", help="no progress line (it is shown only on a terminal anyway)")


def backbone_values(args, params: dict) -> dict:
    """The flat backbone parameters (the node's names) from the flags, ``--reduction-params``
    and the ``reduction.<name>`` entries of ``--param``."""
    from spark3r.mapping.config import REDUCTION_PREFIX

    try:
        reduction_params = json.loads(args.reduction_params)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--reduction-params must be a JSON object, got {args.reduction_params!r}: {exc}") from None
    if not isinstance(reduction_params, dict):
        raise ValueError(f"--reduction-params must be a JSON object, got {args.reduction_params!r}")
    if args.reduction_schedule and args.reduction != "spark3r":
        raise ValueError(f"--reduction-schedule is only used by --reduction spark3r, got --reduction {args.reduction}")
    values = {"backbone": args.backbone, "checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
              "reduction": args.reduction, "reduction_schedule": str(Path(args.reduction_schedule).expanduser())
              if args.reduction_schedule else "", "image_width": args.image_width,
              "cache_max_frames": args.cache_max_frames}
    schedule = reduction_params.pop("schedule", None)
    if schedule is not None:  # the schedule file has its own parameter, reduction_schedule
        if values["reduction_schedule"] and values["reduction_schedule"] != str(Path(schedule).expanduser()):
            raise ValueError("the schedule is given twice (--reduction-schedule and --reduction-params) with different files")
        values["reduction_schedule"] = str(Path(schedule).expanduser())
    for name, value in reduction_params.items():
        values[REDUCTION_PREFIX + name] = value
    for name, value in params.items():
        if name.startswith(REDUCTION_PREFIX):
            if name in values and values[name] != value:
                raise ValueError(f"{name} is given twice (--reduction-params and --param) with different values")
            values[name] = value
    return values


def build_backbone(args, params: Optional[dict] = None) -> tuple[object, dict]:
    """The backbone chosen on the command line (a BackboneConfig for a model: it is built only
    once the inputs are fine) and a description for the report."""
    from spark3r.mapping import BackboneConfig

    # Checked even for the test double, so a bad flag is refused the same way with any backbone.
    cfg = BackboneConfig.from_flat(backbone_values(args, params or {}))
    if args.ground_truth is not None:
        from spark3r.mapping.testing import GroundTruthBackbone
        from spark3r.offline.benchmark import load_tum_ground_truth

        return GroundTruthBackbone(load_tum_ground_truth(args.ground_truth)), {
            "type": "GroundTruthBackbone (test double)", "ground_truth": str(args.ground_truth)}
    return cfg, {"type": "ModelBackbone", "backbone": cfg.backbone, "checkpoint": cfg.checkpoint, "reduction": cfg.reduction,
                 "reduction_params": cfg.reduction_params, "image_width": cfg.image_width, "device": cfg.device,
                 "dtype": cfg.dtype}


def run(args) -> int:
    from spark3r.mapping import MapperConfig
    from spark3r.mapping.config import REDUCTION_PREFIX
    from spark3r.offline.inputs import open_input
    from spark3r.offline.runner import run_map

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Every parameter is checked (names, ranges, relations) before any input is opened.
        params = parse_params(args.param)
        config = MapperConfig.from_flat({n: v for n, v in params.items() if not n.startswith(REDUCTION_PREFIX)})
        backbone, info = build_backbone(args, params)
        source = open_input(args.input, kind=args.kind, topic=args.topic, fps=args.fps,
                            camera_info_topic=args.camera_info_topic)
        if not hasattr(backbone, "predict"):  # a BackboneConfig: build the model only once inputs are fine
            from spark3r.mapping.model_backbone import ModelBackbone

            backbone = ModelBackbone.from_config(backbone, config.window.window_size, config.window.window_stride)
        report = run_map(source, args.out, config, backbone, backbone_info=info, overwrite=args.overwrite,
                         progress=None if args.no_progress or not sys.stderr.isatty() else sys.stderr,
                         max_frames=args.max_frames, load_session=args.load_session,
                         localization_only=args.localization_only, save_session=args.save_session)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"spark3r map: error: {exc}", file=sys.stderr)
        return 2
    state = "interrupted (partial outputs)" if report["interrupted"] else "complete"
    print(f"spark3r map: {state}: {report['frames']} frames, {report['keyframes_mapped']} keyframes mapped, "
          f"{report['map_points']} map points -> {args.out}")
    return 130 if report["interrupted"] else 0


def main(argv=None) -> int:
    """``python -m spark3r.offline.cli`` = ``spark3r map``."""
    parser = argparse.ArgumentParser(prog="spark3r map", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
