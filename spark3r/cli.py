"""The ``spark3r`` command line: ``spark3r <command> [options]``.

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
registering one is a single entry in :data:`COMMANDS` (name -> (module, one-line help)).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("spark3r.bench.cli", "compare token-reduction methods: time, FLOPs, memory, fidelity (JSON)"),
    "calibrate": ("spark3r.bench.calibrate", "measure per-layer sensitivity and write a K/V schedule file"),
    "map": ("spark3r.offline.cli", "map a bag / TUM folder / image folder / video offline with the node's mapper"),
    "eval": ("spark3r.eval.cli", "ATE/RPE, depth and cloud metrics of a map output against ground truth"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark3r", description="spark3r: feed-forward 3-D reconstruction with Spark3R token reduction")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"spark3r {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
