"""``spark3r map``: ``add_arguments(parser)`` + ``run(args)``, registered in ``spark3r/cli.py``."""
from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from spark3r.threads import add_threads_argument


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
    p.add_argument("--intrinsics", metavar="FX,FY,CX,CY|FILE",
                   help="camera intrinsics in pixels for every frame (any input kind), used instead of the "
                        "backbone's predicted ones and of the input's own; or a file with one line "
                        "'fx fy cx cy [width height]'")
    p.add_argument("--backbone", "--model", dest="backbone", default=None,
                   help="model preset: vggt-1b (default), pi3, da3-small, da3-base, da3-large, da3-giant "
                        "(vggt-tiny, pi3-tiny for tests)")
    p.add_argument("--checkpoint", default="", help="weights file / directory / hub id, or 'seeded' (test weights)")
    p.add_argument("--reduction", default="dense", help="global-attention token reduction (dense, uniform, spark3r, ...)")
    p.add_argument("--reduction-params", default="{}", help="JSON keyword parameters of the reduction method")
    p.add_argument("--reduction-schedule", default="",
                   help="Spark3R key/value schedule JSON file (reduction spark3r; as the node's reduction_schedule)")
    p.add_argument("--cache-max-frames", type=int, default=0,
                   help="patch-embedding cache capacity in keyframes (0 = window_size + window_stride)")
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights / compute dtype (default float32; bfloat16 or float16 on a GPU)")
    p.add_argument("--image-width", type=int, default=0,
                   help="network input width, 28-4088 in steps of 14 (0 = the preset's native width: 518, vggt-nano 140)")
    p.add_argument("--ground-truth", type=Path, metavar="TUM_DIR",
                   help="TEST DOUBLE instead of a model: answer windows with this TUM folder's ground truth")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="mapper parameter or reduction method parameter reduction.<name> (same names as the ROS node), "
                        "repeatable, e.g. --param window_size=8 --param reduction.query_keep=1")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (default: a live line on a terminal, else a plain line every "
                        "--progress-interval seconds)")
    p.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between plain progress lines when stderr is not a terminal (default 30)")
    p.add_argument("--save-session", type=Path, metavar="DIR",
                   help="also write a loadable map session (keyframes, poses, graph, descriptors, points) to DIR")
    p.add_argument("--load-session", type=Path, metavar="DIR",
                   help="start from a saved session: new keyframes extend it once relocalized (see --localization-only)")
    p.add_argument("--localization-only", action="store_true",
                   help="with --load-session: only localize in the loaded map, never extend it")


DEFAULT_BACKBONE = "vggt-1b"

# Options that only configure a model: with --ground-truth (no model) they would be ignored.
_MODEL_OPTIONS = {"backbone": None, "checkpoint": "", "reduction": "dense", "reduction_params": "{}",
                  "reduction_schedule": "", "cache_max_frames": 0, "threads": 0}


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
    values = {"backbone": args.backbone or DEFAULT_BACKBONE, "checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
              "reduction": args.reduction, "reduction_schedule": str(Path(args.reduction_schedule).expanduser())
              if args.reduction_schedule else "", "image_width": args.image_width,
              "cache_max_frames": args.cache_max_frames, "threads": args.threads}
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

    from spark3r.mapping.config import REDUCTION_PREFIX

    # Checked even for the test double, so a bad flag is refused the same way with any backbone.
    cfg = BackboneConfig.from_flat(backbone_values(args, params or {}))
    if args.ground_truth is not None:
        given = ["--" + name.replace("_", "-") for name, default in _MODEL_OPTIONS.items()
                 if getattr(args, name, default) != default]
        given += [f"--param {name}" for name in (params or {}) if name.startswith(REDUCTION_PREFIX)]
        if given:
            raise ValueError(f"--ground-truth replaces the model with a test double, so {', '.join(given)} would be "
                             "ignored; drop --ground-truth to run the model, or drop those options")
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
        if args.intrinsics is not None and not config.map.use_camera_info_intrinsics:
            raise ValueError("--intrinsics needs use_camera_info_intrinsics=true (it is what makes the mapper use "
                             "given intrinsics instead of the backbone's)")
        backbone, info = build_backbone(args, params)
        source = open_input(args.input, kind=args.kind, topic=args.topic, fps=args.fps,
                            camera_info_topic=args.camera_info_topic, intrinsics=args.intrinsics)
        if not hasattr(backbone, "predict"):  # a BackboneConfig: build the model only once inputs are fine
            from spark3r.mapping.model_backbone import ModelBackbone

            backbone = ModelBackbone.from_config(backbone, config.window.window_size, config.window.window_stride)
        report = run_map(source, args.out, config, backbone, backbone_info=info, overwrite=args.overwrite,
                         progress=None if args.no_progress else sys.stderr, live_progress=sys.stderr.isatty(),
                         progress_interval_s=args.progress_interval, max_frames=args.max_frames,
                         load_session=args.load_session, localization_only=args.localization_only,
                         save_session=args.save_session)
    except (ValueError, TypeError, OSError) as exc:
        print(f"spark3r map: error: {exc}", file=sys.stderr)
        return 2
    state = ("interrupted (partial outputs)" if report["interrupted"] else
             "FAILED, mapped nothing" if report["mapped_nothing"] else "complete")
    print(f"spark3r map: {state}: {report['frames']} frames, {report['keyframes_mapped']} keyframes mapped, "
          f"{report['map_points']} map points -> {args.out}")
    if report["mapped_nothing"] and not report["interrupted"]:
        print(f"spark3r map: ERROR: nothing was mapped. {_why_nothing(report)} "
              f"(outputs and report.json written to {args.out})", file=sys.stderr)
        return 1
    if report["interrupted"]:
        return 143 if report.get("stopped_by") == "SIGTERM" else 130
    return 0


def _why_nothing(report: dict) -> str:
    """One sentence on why a run mapped no keyframe, from its drop counters."""
    drops, attempts = report["drops"], len(report["window_attempts"])
    if attempts == 0:
        return (f"No window was run: {report['mapper_stats']['keyframes']} keyframes from {report['frames']} frames "
                "(too few keyframes for a window? lower window_size or min_parallax_px with --param).")
    parts = [f"{n} {what}" for what, n in (
        ("with non-finite pose or intrinsics", drops["windows_dropped_nonfinite"]),
        ("rejected by the alignment", drops["windows_rejected_alignment"]),
        ("with invalid backbone output", drops["windows_dropped_invalid"]),
        ("failed in the backbone", drops["backbone_errors"])) if n]
    text = f"All {attempts} windows were dropped ({', '.join(parts) or 'see report.json'})."
    if drops["windows_dropped_nonfinite"] and report["input"].get("intrinsics") == "backbone":
        text += (" The backbone's predicted intrinsics are unusable and the input has none: "
                 "pass --intrinsics fx,fy,cx,cy.")
    if drops["backbone_errors"] and drops.get("last_backbone_error"):
        text += f" Last backbone error: {drops['last_backbone_error']}."
    return text


def main(argv=None) -> int:
    """``python -m spark3r.offline.cli`` = ``spark3r map``."""
    parser = argparse.ArgumentParser(prog="spark3r map", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
