"""Replay a rosbag2 bag (mcap or sqlite3) into a running ROS graph, with /clock from bag time.

    python -m spark3r_ros.bag_replay BAG [--rate R] [--clock [HZ]] [--loop] [--topics T ...]
                                         [--wait-for TOPIC ...] [--start-paused-s S]

A small stand-in for ``ros2 bag play --clock`` where only rclpy (pip wheels) is available.
Messages are published as recorded (the serialized CDR bytes, so header stamps stay bag time)
with each topic's recorded QoS (``/tf_static`` and other transient-local topics stay latched
for late subscribers while the replay runs). With ``--clock``, ``rosgraph_msgs/Clock`` carrying
the bag time is published at HZ (default 40, as ros2 bag play) and right before every message,
so nodes started with ``use_sim_time:=true`` run on the bag's clock. ``--loop`` starts over when
the bag ends (bag time jumps back; the mapping node treats that as a new map).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

CLOCK_TOPIC = "/clock"


def message_class(msgtype: str):
    """``"sensor_msgs/msg/Image"`` -> the rclpy message class (ValueError if not installed)."""
    package, kind, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ImportError, AttributeError):
        raise ValueError(f"message type {msgtype} is not available in this ROS environment; "
                         "install its package or leave its topic out with --topics") from None


def recorded_qos(connection):
    """The QoS a topic was recorded with (first offered profile), as an rclpy QoSProfile."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    profiles = getattr(connection.ext, "offered_qos_profiles", None) or []
    if not profiles:
        return QoSProfile(depth=10)
    q = profiles[0]
    transient = q.durability.name == "TRANSIENT_LOCAL"
    best_effort = q.reliability.name == "BEST_EFFORT"
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=max(int(q.depth), 1) if q.depth else 10,
        reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m spark3r_ros.bag_replay", description=__doc__.splitlines()[0])
    p.add_argument("bag", type=Path, help="rosbag2 directory (or .mcap / .db3 file)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    p.add_argument("--clock", type=float, nargs="?", const=40.0, default=None, metavar="HZ",
                   help="publish /clock from bag time at HZ (default 40 when given without a value)")
    p.add_argument("--loop", action="store_true", help="start over at the end of the bag")
    p.add_argument("--topics", nargs="+", help="only these topics (default: all)")
    p.add_argument("--wait-for", nargs="+", default=[], metavar="TOPIC",
                   help="before playing, wait until each of these topics has a subscriber (up to 30 s)")
    p.add_argument("--start-paused-s", type=float, default=0.0, help="sleep this long before playing (discovery)")
    args = p.parse_args(argv)
    if not (args.rate > 0):
        p.error(f"--rate must be > 0, got {args.rate}")
    if args.clock is not None and not (args.clock > 0):
        p.error(f"--clock rate must be > 0 Hz, got {args.clock}")
    return args


class Replayer:
    def __init__(self, node, bag: Path, topics=None, rate: float = 1.0, clock_hz=None):
        from rclpy.qos import QoSProfile
        from rosgraph_msgs.msg import Clock

        from spark3r.data.bag_io import open_reader

        self.node, self.bag, self.rate, self.clock_hz = node, bag, float(rate), clock_hz
        reader = open_reader(bag)
        try:
            connections = list(reader.connections)
            self.start_ns, self.end_ns = reader.start_time, reader.end_time
        finally:
            reader.close()
        available = {c.topic for c in connections}
        if topics:
            missing = sorted(set(topics) - available)
            if missing:
                raise ValueError(f"topics {missing} are not in bag {bag}; it has {sorted(available)}")
            connections = [c for c in connections if c.topic in set(topics)]
        self.connections = connections
        self.publishers = {}
        for c in connections:
            if c.topic not in self.publishers:
                self.publishers[c.topic] = node.create_publisher(message_class(c.msgtype), c.topic, recorded_qos(c))
        self._clock_msg = Clock
        self.clock_pub = node.create_publisher(Clock, CLOCK_TOPIC, QoSProfile(depth=1)) if clock_hz else None
        self.published = 0

    def publish_clock(self, bag_ns: int) -> None:
        if self.clock_pub is None:
            return
        from builtin_interfaces.msg import Time

        self.clock_pub.publish(self._clock_msg(clock=Time(sec=int(bag_ns // 10**9), nanosec=int(bag_ns % 10**9))))

    def _sleep_until(self, wall_target: float, wall_start: float, bag_start: int) -> None:
        """Sleep until ``wall_target``, publishing /clock at its rate meanwhile."""
        period = 1.0 / self.clock_hz if self.clock_hz else None
        while True:
            now = time.monotonic()
            if now >= wall_target:
                return
            if period is None:
                time.sleep(wall_target - now)
                return
            self.publish_clock(bag_start + int((now - wall_start) * self.rate * 1e9))
            time.sleep(min(period, wall_target - now))

    def play_once(self) -> int:
        from spark3r.data.bag_io import open_reader

        reader = open_reader(self.bag)
        try:
            wall_start = time.monotonic()
            for conn, bag_ns, raw in reader.messages(connections=self.connections):
                target = wall_start + (bag_ns - self.start_ns) / 1e9 / self.rate
                self._sleep_until(target, wall_start, self.start_ns)
                self.publish_clock(bag_ns)
                self.publishers[conn.topic].publish(bytes(raw))
                self.published += 1
        finally:
            reader.close()
        self.publish_clock(self.end_ns)
        return self.published


def wait_for_subscribers(node, publishers: dict, topics, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for topic in topics:
        if topic not in publishers:
            raise ValueError(f"--wait-for {topic}: not a replayed topic ({sorted(publishers)})")
        while publishers[topic].get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber on {topic} after {timeout_s:g} s")
            time.sleep(0.05)


def main(argv=None) -> int:
    import rclpy

    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    args = parse_args(argv[:split])
    rclpy.init(args=["bag_replay", *argv[split:]])
    node = rclpy.create_node("spark3r_bag_replay")
    try:
        replayer = Replayer(node, args.bag, args.topics, args.rate, args.clock)
        waitable = dict(replayer.publishers)
        if replayer.clock_pub is not None:
            waitable[CLOCK_TOPIC] = replayer.clock_pub
        wait_for_subscribers(node, waitable, args.wait_for)
        if args.start_paused_s > 0:
            time.sleep(args.start_paused_s)
        while True:
            replayer.play_once()
            if not args.loop:
                break
        node.get_logger().info(f"replayed {replayer.published} messages from {args.bag}")
        return 0
    except (ValueError, FileNotFoundError, TimeoutError) as exc:
        print(f"bag_replay: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
