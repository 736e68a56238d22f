"""The main job: the mapping node end to end on a synthetic camera stream over real (loopback) DDS.

    python -m spark3r_ros.demo --out out/demo                                   # ground-truth test double
    python -m spark3r_ros.demo --out out/demo --backbone vggt-tiny --checkpoint seeded

Starts two processes on a private loopback-only DDS domain — the mapping node and
``spark3r_ros.synthetic_camera`` (images + camera_info + /tf_static) — records what the node
publishes (TF, odometry, path, cloud, map, diagnostics), calls ``~/save_map`` at the end and
writes ``OUT/map.ply``, ``OUT/trajectory.tum`` (the node's ``~/save_map`` files, named as
``spark3r map`` names them) and ``OUT/demo_report.json``. With the
ground-truth double the report also holds the trajectory's ATE against the synthetic ground truth
after a Sim(3) alignment. Exit code 0 only if a map and a trajectory were produced.

``--backbone ground-truth`` (default) runs ``spark3r_ros.ground_truth_node``: the real node with
a TEST DOUBLE backbone that returns the synthetic scene's ground truth (no weights needed).
Any other value is a model preset for the real node (``spark3r_ros.mapping_node``).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spark3r.data import strict_json
from spark3r_ros.dds_env import apply_loopback_env, loopback_env

GROUND_TRUTH = "ground-truth"
NODE = "spark3r_mapping"
IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
REPO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "mapping.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--backbone", default=GROUND_TRUTH, help=f"'{GROUND_TRUTH}' (test double) or a model preset, e.g. vggt-tiny")
    parser.add_argument("--checkpoint", default="seeded", help="weights for a model preset ('seeded' = deterministic test weights)")
    parser.add_argument("--frames", type=int, default=48, help="frames of the synthetic sequence")
    parser.add_argument("--rate", type=float, default=8.0, help="publishing rate in Hz")
    parser.add_argument("--seed", type=int, default=7, help="synthetic scene seed")
    parser.add_argument("--image-width", type=int, default=112, help="network input width for a model preset")
    parser.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.frames < 8:
        parser.error("--frames must be >= 8 (the demo window has 8 keyframes)")
    return args


def scene_args(args) -> list[str]:
    return ["--frames", str(args.frames), "--seed", str(args.seed), "--height", "96", "--width", "128", "--fps", "10"]


def node_command(args, save_dir: Path) -> list[str]:
    params = {
        "save_directory": str(save_dir), "window_size": 8, "window_stride": 4, "min_parallax_px": 4.0,
        "max_time_gap_s": 1.0, "voxel_size": 0.01, "map_publish_period": 0.5, "queue_depth": 8,
    }
    if args.backbone == GROUND_TRUTH:
        head = ["-m", "spark3r_ros.ground_truth_node", *scene_args(args)]
    else:
        head = ["-m", "spark3r_ros.mapping_node"]
        params.update(backbone=args.backbone, checkpoint=args.checkpoint, image_width=args.image_width)
    ros = ["--ros-args", "-r", f"__node:={NODE}", "-r", f"image:={IMAGE_TOPIC}", "-r", f"camera_info:={CAMERA_INFO_TOPIC}"]
    if REPO_CONFIG.is_file():
        ros += ["--params-file", str(REPO_CONFIG)]
    for name, value in params.items():
        ros += ["-p", f"{name}:={_param_literal(value)}"]
    return [sys.executable, *head, *ros]


def _param_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


class Child:
    """A child process in its own process group with its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path):
        env = loopback_env(os.environ, int(os.environ["ROS_DOMAIN_ID"]))
        env.pop("_ROS_WHEELS_BOOTSTRAP_COMPLETE", None)  # let the child bootstrap its own ROS libraries
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.popen.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return self.popen.poll()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Recorder:
    """Subscribes to everything the node publishes (node name ``node_name``) and keeps every
    message, counts, frames, TF edges and the latest diagnostics of the node."""

    def __init__(self, node, node_name: str = NODE):
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Odometry, Path as PathMsg
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2
        from std_srvs.srv import Trigger
        from tf2_msgs.msg import TFMessage

        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.counts = {"tf": 0, "odometry": 0, "path": 0, "cloud": 0, "map": 0}
        self.tf_edges: dict[str, int] = {}
        self.frames: dict[str, set] = {k: set() for k in self.counts}
        self.last: dict[str, object] = {}
        self.messages: dict[str, list] = {k: [] for k in self.counts}
        self.diagnostics: dict[str, str] = {}
        self.diagnostics_history: list[tuple[int, str, dict]] = []  # (level, message, values)
        self.diag_level = None
        self.node_name = node_name
        self.subs = {
            "tf": node.create_subscription(TFMessage, "/tf", self._on("tf"), 100),
            "odometry": node.create_subscription(Odometry, f"/{node_name}/odometry", self._on("odometry"), 50),
            "path": node.create_subscription(PathMsg, f"/{node_name}/path", self._on("path"), latched),
            "cloud": node.create_subscription(PointCloud2, f"/{node_name}/cloud", self._on("cloud"), 10),
            "map": node.create_subscription(PointCloud2, f"/{node_name}/map", self._on("map"), latched),
        }
        self.diag_sub = node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.save_client = node.create_client(Trigger, f"/{node_name}/save_map")
        self.reset_client = node.create_client(Trigger, f"/{node_name}/reset")

    def _on(self, key):
        def callback(msg):
            self.counts[key] += 1
            self.last[key] = msg
            self.messages[key].append(msg)
            if key == "tf":
                for t in msg.transforms:
                    edge = f"{t.header.frame_id}->{t.child_frame_id}"
                    self.tf_edges[edge] = self.tf_edges.get(edge, 0) + 1
            else:
                self.frames[key].add(msg.header.frame_id)
        return callback

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith(self.node_name + ":"):
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diag_level = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else int(status.level)
                self.diagnostics_history.append((self.diag_level, status.message, self.diagnostics))


def spin_until(executor, predicate, timeout: float, children=()) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        for child in children:
            if not child.running() and child.popen.returncode not in (0, None):
                raise RuntimeError(f"child {child.popen.args[2]} failed (exit {child.popen.returncode}):\n{child.tail()}")
        if time.monotonic() > deadline:
            return False
        executor.spin_once(timeout_sec=0.05)
    return True


def trajectory_ate(trajectory_path: Path, args) -> dict:
    """ATE (RMS of camera-centre errors) after a Sim(3) alignment to the synthetic ground truth."""
    from spark3r.data.io import read_tum_trajectory
    from spark3r.mapping import umeyama
    from spark3r_ros.synthetic_camera import add_scene_arguments, render_scene

    stamps, poses = read_tum_trajectory(trajectory_path)
    parser = argparse.ArgumentParser()
    add_scene_arguments(parser)
    seq = render_scene(parser.parse_args(scene_args(args)))
    index = {int(s): i for i, s in enumerate(seq.stamps_ns)}
    gt = seq.c2w[[index[int(s)] for s in stamps]]
    S = umeyama(poses[:, :3, 3], gt[:, :3, 3])
    err = np.linalg.norm(S.apply(poses[:, :3, 3]) - gt[:, :3, 3], axis=1)
    return {"ate_rmse_m": float(np.sqrt(np.mean(err ** 2))), "ate_max_m": float(err.max()), "poses": int(len(stamps)),
            "sim3_scale": float(S.scale), "scene_extent_m": float(seq.scene_extent)}


def run(args) -> int:
    apply_loopback_env()
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="spark3r_demo_"))
    started = time.monotonic()
    report: dict = {"backbone": args.backbone, "checkpoint": args.checkpoint if args.backbone != GROUND_TRUTH else None,
                    "frames": args.frames, "rate_hz": args.rate, "domain_id": int(os.environ["ROS_DOMAIN_ID"])}
    rclpy.init()
    node = rclpy.create_node("spark3r_demo_recorder")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    rec = Recorder(node)
    mapper = Child(node_command(args, out), logs / "mapping_node.log")
    camera = None
    ok = False
    try:
        print(f"[demo] mapping node started ({args.backbone}); waiting for DDS matching", flush=True)
        matched = spin_until(executor, lambda: all(s.get_publisher_count() > 0 for s in rec.subs.values())
                             and rec.save_client.service_is_ready(), 60.0, [mapper])
        if not matched:
            raise RuntimeError(f"the mapping node's topics did not appear within 60 s:\n{mapper.tail()}")
        camera = Child([sys.executable, "-m", "spark3r_ros.synthetic_camera", *scene_args(args), "--rate", str(args.rate),
                        "--image-topic", IMAGE_TOPIC, "--camera-info-topic", CAMERA_INFO_TOPIC], logs / "camera.log")
        print(f"[demo] streaming {args.frames} synthetic frames at {args.rate} Hz", flush=True)
        remaining = args.timeout - (time.monotonic() - started)
        if not spin_until(executor, lambda: not camera.running(), remaining, [mapper, camera]):
            raise RuntimeError(f"the camera did not finish streaming in time:\n{camera.tail()}")
        if camera.popen.returncode != 0:
            raise RuntimeError(f"the camera failed:\n{camera.tail()}")

        # The node is done when every received image went through the gate and no window is due.
        def settled():
            d = rec.diagnostics
            if not d:
                return False
            handled = sum(int(d.get(k, 0)) for k in ("frames_offered", "images_dropped_queue", "images_bad",
                                                     "images_dropped_no_backbone"))
            return int(d["images_received"]) >= args.frames and handled >= int(d["images_received"]) \
                and int(d["queue_depth"]) == 0 and int(d.get("pending_keyframes", 0)) == 0
        remaining = args.timeout - (time.monotonic() - started)
        if not spin_until(executor, settled, max(remaining, 5.0), [mapper]):
            print("[demo] warning: the node did not report all frames processed before the timeout", flush=True)
        stable_until = time.monotonic() + 2.0  # let the last window and the rate-limited map arrive
        spin_until(executor, lambda: time.monotonic() > stable_until, 3.0, [mapper])

        future = rec.save_client.call_async(Trigger.Request())
        spin_until(executor, future.done, 60.0, [mapper])
        response = future.result()
        report["save_map"] = {"success": bool(response.success), "message": response.message}
        print(f"[demo] ~/save_map: {response.message}", flush=True)
        trajectory = out / "trajectory.tum"
        report.update(received=rec.counts, tf_edges=rec.tf_edges,
                      frames={k: sorted(v) for k, v in rec.frames.items() if v},
                      diagnostics=rec.diagnostics, diagnostics_level=rec.diag_level)
        if "map" in rec.last:
            report["map_points_published"] = int(rec.last["map"].width)
        if "path" in rec.last:
            report["path_poses"] = len(rec.last["path"].poses)
        if trajectory.is_file() and args.backbone == GROUND_TRUTH:
            try:
                report["ate"] = trajectory_ate(trajectory, args)
            except (ValueError, KeyError) as exc:
                report["ate_error"] = f"{type(exc).__name__}: {exc}"
        ok = bool(response.success) and (out / "map.ply").is_file() and trajectory.is_file() \
            and report.get("map_points_published", 0) > 0 and report.get("path_poses", 0) >= 2
        if not ok:
            report["failure"] = ("no map or no trajectory was produced; see diagnostics "
                                 f"(e.g. windows_dropped_nonfinite={rec.diagnostics.get('windows_dropped_nonfinite')}, "
                                 f"backbone_error={rec.diagnostics.get('backbone_error')!r})")
    except RuntimeError as exc:
        report["failure"] = str(exc)
        print(f"[demo] error: {exc}", file=sys.stderr, flush=True)
    finally:
        for child in (camera, mapper):
            if child is not None:
                child.stop()
        report["node_exit_code"] = mapper.popen.returncode
        report["node_log_tail"] = mapper.tail(2000)
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        report["ok"] = ok
        (out / "demo_report.json").write_text(strict_json.dumps(report, indent=1, sort_keys=True) + "\n")
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    summary = {k: report.get(k) for k in ("ok", "received", "path_poses", "map_points_published", "ate", "wall_time_s")}
    print(f"[demo] {strict_json.dumps(summary)}", flush=True)
    print(f"[demo] outputs in {out}: map.ply, trajectory.tum, demo_report.json", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
