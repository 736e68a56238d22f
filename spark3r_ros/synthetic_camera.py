"""A synthetic camera over DDS: rendered images + camera_info + the base -> camera extrinsic.

    python -m spark3r_ros.synthetic_camera --frames 48 --rate 10 --image-topic /camera/image_raw

Publishes, in this order: ``/tf_static`` (``base_link -> camera_optical_frame``, the synthetic
rig's mount; transient-local), then, once a subscriber has matched the image topic, every frame
of :func:`spark3r.data.synthetic.render_sequence` (or, with ``--scene procedural``, of
:func:`spark3r.data.procedural.render_procedural`) as ``sensor_msgs/Image`` (rgb8; or
``CompressedImage`` on ``<image-topic>/compressed`` with ``--compressed``) and ``CameraInfo``,
stamped with the sequence's own stamps, at ``--rate`` Hz of wall time. ``--repeat`` streams the
sequence again with the same stamps (time goes backwards, like a looping bag). Exits after the
stream (``--linger`` seconds later, so the last messages are delivered).

``--trajectory loop`` renders :func:`spark3r.mapping.testing.loop_sequence` instead (the camera
comes back to its start: loop closure tests). The scene arguments (:func:`add_scene_arguments`) are shared with the ground-truth test-double
node so that both render the same sequence.
"""
from __future__ import annotations

import argparse
import sys
import time

DEFAULT_CAMERA_FRAME = "camera_optical_frame"


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    from spark3r.data.procedural import MOTIONS

    scene = parser.add_argument_group("synthetic scene (spark3r.data.synthetic / spark3r.data.procedural)")
    scene.add_argument("--scene", default="room", choices=("room", "procedural"),
                       help="room: the fixed furnished room (spark3r.data.synthetic); procedural: procedural scene "
                            "--seed (spark3r.data.procedural; seeds < 100000 are never used in training)")
    scene.add_argument("--frames", type=int, default=48, help="number of frames in the sequence")
    scene.add_argument("--height", type=int, default=96)
    scene.add_argument("--width", type=int, default=128)
    scene.add_argument("--seed", type=int, default=7, help="room: texture/colour/start-phase seed; procedural: scene seed")
    scene.add_argument("--trajectory", default="orbit", choices=("orbit", "forward", "static", "loop"),
                       help="room camera path; 'loop': a closed orbit that comes back to its start after "
                            "--frames-per-lap frames (spark3r.mapping.testing.loop_sequence), for loop closure")
    scene.add_argument("--frames-per-lap", type=float, default=60.37, help="'loop' trajectory: frames per lap")
    scene.add_argument("--motion", default=None, choices=MOTIONS, help="procedural camera motion (default: drawn from the seed)")
    scene.add_argument("--fps", type=float, default=10.0, help="frame rate of the stamps (scene time)")


def render_scene(args):
    if getattr(args, "scene", "room") == "procedural":
        from spark3r.data.procedural import render_procedural

        return render_procedural(args.seed, args.frames, args.height, args.width, motion=args.motion, fps=args.fps)
    if args.trajectory == "loop":
        from spark3r.mapping.testing import loop_sequence

        return loop_sequence(num_frames=args.frames, frames_per_lap=args.frames_per_lap, height=args.height,
                             width=args.width, seed=args.seed, fps=args.fps)
    from spark3r.data.synthetic import render_sequence

    return render_sequence(num_frames=args.frames, height=args.height, width=args.width, seed=args.seed,
                           trajectory=args.trajectory, fps=args.fps)


def camera_info_msg(seq, stamp_ns: int, frame_id: str):
    from sensor_msgs.msg import CameraInfo

    from spark3r_ros.conversions import as_time_msg

    K = [float(v) for v in seq.K.reshape(-1)]
    msg = CameraInfo(width=int(seq.width), height=int(seq.height), distortion_model="plumb_bob",
                     d=[0.0] * 5, k=K, r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                     p=[K[0], K[1], K[2], 0.0, K[3], K[4], K[5], 0.0, K[6], K[7], K[8], 0.0])
    msg.header.stamp = as_time_msg(int(stamp_ns))
    msg.header.frame_id = frame_id
    return msg


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_arguments(parser)
    parser.add_argument("--rate", type=float, default=10.0, help="publishing rate in Hz of wall time")
    parser.add_argument("--image-topic", default="/camera/image_raw")
    parser.add_argument("--camera-info-topic", default="/camera/camera_info")
    parser.add_argument("--no-camera-info", action="store_true", help="publish no camera_info (uncalibrated camera)")
    parser.add_argument("--compressed", action="store_true", help="publish JPEG CompressedImage on <image-topic>/compressed")
    parser.add_argument("--frame-id", default=DEFAULT_CAMERA_FRAME, help="camera optical frame id of the images")
    parser.add_argument("--base-frame", default="base_link")
    parser.add_argument("--repeat", type=int, default=1, help="stream the sequence this many times (same stamps)")
    parser.add_argument("--match-timeout", type=float, default=60.0, help="seconds to wait for an image subscriber")
    parser.add_argument("--linger", type=float, default=1.0, help="seconds to stay up after the last frame")
    parser.add_argument("--first-frame", type=int, default=0,
                        help="stream the sequence from this frame on (e.g. a camera that starts elsewhere in a saved map)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.repeat < 1:
        parser.error("--rate must be > 0 and --repeat >= 1")
    if not 0 <= args.first_frame < args.frames:
        parser.error("--first-frame must be in [0, --frames)")
    return args


def stream(node, args, seq) -> int:
    """Publish the static transform, then the frames; returns the number of images sent."""
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from tf2_msgs.msg import TFMessage

    from spark3r_ros.conversions import matrix_to_transform, numpy_to_compressed, numpy_to_image
    from spark3r_ros.static_tf import TF_STATIC_TOPIC, tf_static_qos

    stamps = [int(s) for s in seq.stamps_ns]
    tf_pub = node.create_publisher(TFMessage, TF_STATIC_TOPIC, tf_static_qos())
    tf_pub.publish(TFMessage(transforms=[matrix_to_transform(seq.base_to_camera, stamps[0], args.base_frame, args.frame_id)]))
    topic = args.image_topic.rstrip("/") + "/compressed" if args.compressed else args.image_topic
    image_pub = node.create_publisher(CompressedImage if args.compressed else Image, topic, 10)
    info_pub = None if args.no_camera_info else node.create_publisher(CameraInfo, args.camera_info_topic, 10)
    deadline = time.monotonic() + args.match_timeout
    while image_pub.get_subscription_count() < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"no subscriber matched {topic} within {args.match_timeout} s")
        time.sleep(0.02)
    # Give the latched extrinsic a head start on the images (a mapper that listens to
    # /tf_static has matched by now; transient-local delivers it right after matching).
    while tf_pub.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    sent = 0
    start = time.monotonic()
    for _ in range(args.repeat):
        for i, stamp in enumerate(stamps):
            if i < args.first_frame:
                continue
            if info_pub is not None:
                info_pub.publish(camera_info_msg(seq, stamp, args.frame_id))
            image = seq.images[i]
            msg = (numpy_to_compressed(image, "jpeg", stamp, args.frame_id) if args.compressed
                   else numpy_to_image(image, "rgb8", stamp, args.frame_id))
            image_pub.publish(msg)
            sent += 1
            # A fixed schedule (not sleep-after-work) keeps the nominal rate.
            time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
    return sent


def main(argv=None) -> int:
    args = parse_args(argv)
    seq = render_scene(args)
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init()
    node = rclpy.create_node("spark3r_synthetic_camera")
    try:
        sent = stream(node, args, seq)
        node.get_logger().info(f"published {sent} images")
        end = time.monotonic() + args.linger
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
