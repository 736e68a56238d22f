"""``spark3r eval``: ``add_arguments(parser)`` + ``run(args)``, registered in ``spark3r/cli.py``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


HELP = "ATE/RPE, depth and cloud metrics of a spark3r map output against ground truth (JSON + PNG plots)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("estimate", type=Path, help="spark3r map output folder or TUM trajectory file")
    p.add_argument("--gt", type=Path, required=True, help="TUM RGB-D folder (groundtruth.txt, depth/) or TUM trajectory")
    p.add_argument("--out", type=Path, help="write eval.json and PNG plots here")
    p.add_argument("--align", choices=("sim3", "se3", "none"), default="sim3",
                   help="trajectory alignment (sim3 for monocular/unknown scale)")
    p.add_argument("--max-diff", type=float, default=0.02, help="max stamp difference for association, seconds")
    p.add_argument("--rpe-delta", type=int, default=1, help="RPE step in associated poses")
    p.add_argument("--depth-scale", choices=("median", "trajectory", "none"), default="median",
                   help="depth scale: per-frame median, the trajectory alignment's scale, or none")
    p.add_argument("--reference-cloud", type=Path, help="reference PLY in the ground-truth frame (default: "
                   "<gt>/../reference.ply if present)")
    p.add_argument("--cloud-threshold", type=float, default=0.05, help="distance for precision/recall, cloud units")
    p.add_argument("--no-plots", action="store_true", help="write eval.json only, no PNG plots")


def run(args) -> int:
    from spark3r.eval.runner import evaluate

    try:
        report = evaluate(args.estimate, args.gt, out=args.out, alignment=args.align, max_diff_s=args.max_diff,
                          rpe_delta=args.rpe_delta, depth_scale=args.depth_scale, reference_cloud=args.reference_cloud,
                          cloud_threshold=args.cloud_threshold, plots=not args.no_plots)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"spark3r eval: error: {exc}", file=sys.stderr)
        return 2
    traj = report["trajectory"]
    lines = [f"poses associated: {traj['associated_poses']} (alignment {report['alignment_method']}, "
             f"scale {traj['alignment']['scale']:.4g})",
             f"ATE RMSE: {traj['ate_m']['rmse']:.4g}   RPE translation RMSE: {traj['rpe']['translation_m'].get('rmse', float('nan')):.4g}"
             f"   RPE rotation RMSE: {traj['rpe']['rotation_deg'].get('rmse', float('nan')):.4g} deg"]
    if "depth" in report and report["depth"].get("frames"):
        d = report["depth"]
        lines.append(f"depth ({d['frames']} keyframes, scale {d['scale_mode']}): AbsRel {d['abs_rel']:.4g}  delta<1.25 {d['delta1']:.4g}")
    if "cloud" in report:
        c = report["cloud"]
        lines.append(f"cloud: accuracy {c['accuracy_mean']:.4g}  completeness {c['completeness_mean']:.4g}  "
                     f"chamfer {c['chamfer']:.4g}  F@{c['threshold']:g} {c['fscore']:.3f}")
    if report.get("map_run_complete") is False:
        lines.append("WARNING: the map run was interrupted or incomplete (report.json complete=false)")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    """``python -m spark3r.eval.cli`` = ``spark3r eval``."""
    parser = argparse.ArgumentParser(prog="spark3r eval", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
