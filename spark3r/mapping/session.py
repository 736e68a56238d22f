"""Map sessions: the keyframe store and the pose graph on disk, loadable again.

Layout of a session directory (format ``spark3r-session``, version :data:`SESSION_VERSION`)::

    session.json     format, version, counts, the backend config it was made with
    keyframes.npz    per keyframe: id, stamp, segment, window index, K, camera_info K (NaN if
                     none), pose and odometry pose (4x4 Sim(3) matrices), median depth, radius,
                     descriptor (NaN rows if none)
    points.npz       all keyframes' local points and colours, concatenated, with offsets
    images.npy       uint8 [N, H, W, 3] keyframe images (to re-run the backbone on them)
    graph.npz        between factors (i, j, measured 4x4, sigmas [7], kind), anchors, segment roots

Writing is atomic: everything goes to a sibling temporary directory that replaces ``directory``
in one rename (an existing session is moved aside first and removed after). Reading checks the
format and version and every array's shape, with a clear error for anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .alignment import Sim3
from .config import MapperConfig
from .keyframe_store import KeyframePayload, KeyframeStore, StoredKeyframe
from .pose_graph import FACTOR_LOOP, FACTOR_WINDOW, FactorRecord, PoseGraph

SESSION_FORMAT = "spark3r-session"
SESSION_VERSION = 1
_KINDS = (FACTOR_WINDOW, FACTOR_LOOP)


class SessionError(ValueError):
    """A directory that is not a loadable session."""


def write_session(directory, store: KeyframeStore, graph: PoseGraph, config: MapperConfig, window_index: int) -> Path:
    out = Path(directory)
    if len(store) == 0:
        raise ValueError("nothing to save: the keyframe store is empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        frames = list(store.values())
        payloads = [store.payload(f.id) for f in frames]
        shapes = {p.image.shape for p in payloads}
        if len(shapes) != 1:
            raise ValueError(f"keyframe images differ in size {sorted(shapes)}; a session holds one camera")
        dim = next((len(f.descriptor) for f in frames if f.descriptor is not None), 0)
        nan_K = np.full((3, 3), np.nan)
        np.savez(staging / "keyframes.npz",
                 id=np.array([f.id for f in frames], np.int64),
                 stamp_ns=np.array([f.stamp_ns for f in frames], np.int64),
                 segment=np.array([f.segment for f in frames], np.int64),
                 graph_segment=np.array([graph.segment(f.id) for f in frames], np.int64),
                 window_index=np.array([f.window_index for f in frames], np.int64),
                 K=np.stack([f.K for f in frames]),
                 camera_info_K=np.stack([nan_K if f.camera_info_K is None else f.camera_info_K for f in frames]),
                 pose=np.stack([f.pose.matrix() for f in frames]),
                 odom_pose=np.stack([f.odom_pose.matrix() for f in frames]),
                 median_depth=np.array([f.median_depth for f in frames]),
                 radius=np.array([f.radius for f in frames]),
                 descriptor=np.stack([np.full(dim, np.nan, np.float32) if f.descriptor is None else f.descriptor for f in frames])
                 if dim else np.zeros((len(frames), 0), np.float32))
        counts = np.array([len(p.xyz) for p in payloads], np.int64)
        np.savez(staging / "points.npz", offsets=np.concatenate([[0], np.cumsum(counts)]),
                 xyz=np.concatenate([p.xyz for p in payloads]).astype(np.float32),
                 rgb=np.concatenate([p.rgb for p in payloads]).astype(np.uint8))
        images = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(frames), *payloads[0].image.shape))
        for k, p in enumerate(payloads):
            images[k] = p.image
        images.flush()
        del images
        factors = graph.factors
        np.savez(staging / "graph.npz",
                 i=np.array([r.i for r in factors], np.int64), j=np.array([r.j for r in factors], np.int64),
                 measured=np.stack([r.measured.matrix() for r in factors]) if factors else np.zeros((0, 4, 4)),
                 sigmas=np.stack([r.sigmas for r in factors]) if factors else np.zeros((0, 7)),
                 kind=np.array([_KINDS.index(r.kind) for r in factors], np.int64),
                 anchors=np.array(sorted(graph.anchors), np.int64))
        manifest = {"format": SESSION_FORMAT, "version": SESSION_VERSION, "keyframes": len(frames), "factors": len(factors),
                    "window_index": int(window_index), "backend": asdict(config.backend)}
        (staging / "session.json").write_text(json.dumps(manifest, indent=2))
        _replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace_directory(staging: Path, out: Path) -> None:
    if out.exists():
        if not (out / "session.json").exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists and is not a session directory; refusing to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def read_session(directory, keep_in_memory: int = 0) -> tuple[KeyframeStore, PoseGraph, int]:
    """(store, graph, window index) of a saved session."""
    src = Path(directory)
    manifest_path = src / "session.json"
    if not manifest_path.is_file():
        raise SessionError(f"{src} is not a session directory (no session.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise SessionError(f"{manifest_path} is not valid JSON: {exc}") from None
    if manifest.get("format") != SESSION_FORMAT:
        raise SessionError(f"{src}: format {manifest.get('format')!r}, expected {SESSION_FORMAT!r}")
    if manifest.get("version") != SESSION_VERSION:
        raise SessionError(f"{src}: session version {manifest.get('version')!r}, this build reads version {SESSION_VERSION}")
    try:
        kf = dict(np.load(src / "keyframes.npz"))
        pts = dict(np.load(src / "points.npz"))
        gr = dict(np.load(src / "graph.npz"))
        images = np.load(src / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise SessionError(f"{src}: unreadable session file: {exc}") from None
    n = len(kf["id"])
    if n != manifest.get("keyframes") or len(images) != n or len(pts["offsets"]) != n + 1:
        raise SessionError(f"{src}: inconsistent session (manifest says {manifest.get('keyframes')} keyframes, files hold {n})")
    store = KeyframeStore(keep_in_memory)
    graph = PoseGraph()
    anchors = set(int(a) for a in gr["anchors"])
    for k in range(n):
        kid = int(kf["id"][k])
        a, b = int(pts["offsets"][k]), int(pts["offsets"][k + 1])
        desc = kf["descriptor"][k] if kf["descriptor"].shape[1] else None
        if desc is not None and not np.all(np.isfinite(desc)):
            desc = None
        ci_K = kf["camera_info_K"][k]
        frame = StoredKeyframe(
            id=kid, stamp_ns=int(kf["stamp_ns"][k]), segment=int(kf["graph_segment"][k]), window_index=int(kf["window_index"][k]),
            K=kf["K"][k].copy(), camera_info_K=None if not np.all(np.isfinite(ci_K)) else ci_K.copy(),
            pose=Sim3.from_matrix(kf["pose"][k]), odom_pose=Sim3.from_matrix(kf["odom_pose"][k]), descriptor=desc,
            median_depth=float(kf["median_depth"][k]), radius=float(kf["radius"][k]))
        store.add(frame, KeyframePayload(np.array(images[k]), pts["xyz"][a:b].copy(), pts["rgb"][a:b].copy()))
        graph.add_node(kid, frame.pose, int(kf["graph_segment"][k]), anchor=kid in anchors)
    kinds = gr["kind"]
    for r in range(len(gr["i"])):
        graph.add_between(FactorRecord(int(gr["i"][r]), int(gr["j"][r]), Sim3.from_matrix(gr["measured"][r]), gr["sigmas"][r].copy(),
                                       _KINDS[int(kinds[r])]))
    graph.update([])  # the loaded values are the optimum already
    return store, graph, int(manifest.get("window_index", 0))
