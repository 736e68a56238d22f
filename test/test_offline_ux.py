"""spark3r map as a user meets it (issue 16): --intrinsics for every input kind, a run that maps
nothing fails loudly, SIGTERM like Ctrl-C, strict report.json with the latencies of dropped
windows, progress off a terminal, log lines off the live progress line, and the error messages
that used to mislead (bag folder without metadata.yaml, --ground-truth with model options,
unwritable output folder)."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from spark3r.data.io import format_stamp_ns, read_tum_trajectory
from spark3r.mapping import MapperConfig
from spark3r.mapping.testing import GroundTruthBackbone
from spark3r.offline import cli as map_cli
from spark3r.offline.benchmark import load_tum_ground_truth, write_benchmark
from spark3r.offline.inputs import open_input, parse_intrinsics
from spark3r.offline.runner import run_map

REPO = Path(__file__).resolve().parents[1]
MAPPER_PARAMS = ["window_size=4", "window_stride=2", "min_parallax_px=4.0"]


def _params():
    return [a for p in MAPPER_PARAMS for a in ("--param", p)]


def _config():
    return MapperConfig.from_flat(map_cli.parse_params(MAPPER_PARAMS))


def _strict_load(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} is not strict JSON: it contains {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("ux") / "orbit", num_frames=16, height=120, width=160, seed=0)


@pytest.fixture(scope="module")
def image_folder(bench, tmp_path_factory):
    """The benchmark's frames as a plain image folder: no intrinsics of its own."""
    folder = tmp_path_factory.mktemp("ux") / "images"
    folder.mkdir()
    gt = load_tum_ground_truth(bench["tum"])
    for stamp, rgb in zip(gt.stamps_ns, gt.images):
        cv2.imwrite(str(folder / f"{format_stamp_ns(int(stamp))}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def _tiny_argv(inp, out, *extra):
    return [str(inp), "--out", str(out), "--backbone", "vggt-tiny", "--checkpoint", "seeded", "--image-width", "56",
            "--no-progress", *_params(), *extra]


def test_unusable_predicted_intrinsics_fail_loudly_then_intrinsics_map(bench, image_folder, tmp_path, capsys):
    """The real model path with seeded vggt-tiny, whose predicted focal length is degenerate: an
    image folder maps nothing -> exit 1, a loud reason, outputs and a strict report still
    written, every dropped window timed; the same folder with --intrinsics maps."""
    out = tmp_path / "nothing"
    assert map_cli.main(_tiny_argv(image_folder, out)) == 1
    captured = capsys.readouterr()
    assert "FAILED, mapped nothing" in captured.out
    assert "ERROR: nothing was mapped" in captured.err and "non-finite pose or intrinsics" in captured.err
    assert "--intrinsics" in captured.err
    report = _strict_load(out / "report.json")
    assert report["mapped_nothing"] is True and report["keyframes_mapped"] == 0 and report["complete"] is True
    attempts = report["window_attempts"]
    assert len(attempts) == report["mapper_stats"]["windows"] >= 2
    assert all(a["outcome"] == "dropped_nonfinite" and a["latency_s"] > 0 for a in attempts)
    assert report["timings"]["dropped_window_latency_s"]["count"] == len(attempts)
    assert report["timings"]["window_latency_s"] == {"count": 0}
    assert report["mapper_stats"]["last_scale"] is None  # NaN in the stats -> null
    assert (out / "trajectory.tum").exists() and (out / "map.ply").exists()

    K = load_tum_ground_truth(bench["tum"]).K
    given = f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}"
    out2 = tmp_path / "mapped"
    assert map_cli.main(_tiny_argv(image_folder, out2, "--intrinsics", given, "--threads", "1")) == 0
    report = _strict_load(out2 / "report.json")
    assert report["timings"]["inference_threads"] == 1
    assert report["keyframes_mapped"] >= 3 and report["input"]["intrinsics"] == "given (--intrinsics)"
    assert "intrinsics from --intrinsics" in report["input"]["notes"]
    listing = json.loads((out2 / "keyframes.json").read_text())["keyframes"]
    assert np.allclose(listing[0]["K"], K)  # unprojected with the given K, not the prediction


def test_intrinsics_apply_to_every_input_kind(bench, image_folder, tmp_path):
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (160, 120))
    for f in sorted(image_folder.iterdir()):
        writer.write(cv2.imread(str(f)))
    writer.release()
    file = tmp_path / "camera.txt"
    file.write_text("# fx fy cx cy width height\n100 101 80 60 160 120\n")
    want = np.array([[100.0, 0, 80], [0, 101, 60], [0, 0, 1]])
    for path in (bench["bag"], bench["tum"], image_folder, video):
        for given in ("100,101,80,60", str(file)):
            source = open_input(path, intrinsics=given)
            assert np.array_equal(source.K, want), (path, given)
            next(source.frames())  # the size check passes
            summary = source.summary()
            assert summary["intrinsics"] == "given (--intrinsics)"
            assert not [n for n in summary["notes"] if n.startswith("intrinsics from CameraInfo")]
    # The bag's and TUM folder's own intrinsics are replaced, and that is said.
    assert "--intrinsics replace the input's own intrinsics" in open_input(bench["bag"], intrinsics="1,1,1,1").notes
    wrong_size = tmp_path / "wrong.txt"
    wrong_size.write_text("100 100 80 60 640 480\n")
    with pytest.raises(ValueError, match=r"--intrinsics are for 640x480 images but .* has 160x120 images"):
        next(open_input(image_folder, intrinsics=str(wrong_size)).frames())


@pytest.mark.parametrize("text, message", [
    ("100,100,80", "expects fx,fy,cx,cy"),
    ("a,b,c,d", "expects fx,fy,cx,cy"),
    ("100,nan,80,60", "expects fx,fy,cx,cy"),
    ("0,100,80,60", "focal lengths must be positive"),
    ("100,100,80,60,640.5,480", "width and height must be positive integers"),
])
def test_bad_intrinsics_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_intrinsics(text)


def test_intrinsics_file_errors_name_the_file(tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("1 1 1 1\n2 2 2 2\n")
    with pytest.raises(ValueError, match=f"--intrinsics file {two}: expected one line"):
        parse_intrinsics(str(two))
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=f"--intrinsics file {junk} cannot be read as text"):
        parse_intrinsics(str(junk))


def test_intrinsics_without_camera_info_intrinsics_is_an_error(image_folder, tmp_path, capsys):
    code = map_cli.main([str(image_folder), "--out", str(tmp_path / "o"), "--intrinsics", "1,1,1,1", "--no-progress",
                         "--param", "use_camera_info_intrinsics=false"])
    assert code == 2 and "--intrinsics needs use_camera_info_intrinsics=true" in capsys.readouterr().err


# -- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_in_process_gives_valid_partial_outputs(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    source = open_input(bench["bag"])
    inner = source.read

    def read():
        for i, item in enumerate(inner()):
            if i == 10:
                signal.raise_signal(signal.SIGTERM)  # what `timeout` / systemd / docker stop send
            yield item

    source.read = read
    out = tmp_path / "partial"
    report = run_map(source, out, _config(), GroundTruthBackbone(gt))
    assert report["interrupted"] and not report["complete"] and report["stopped_by"] == "SIGTERM"
    saved = _strict_load(out / "report.json")
    assert saved["stopped_by"] == "SIGTERM" and 10 <= saved["frames"] <= 11 and saved["keyframes_mapped"] > 0
    stamps, _ = read_tum_trajectory(out / "trajectory.tum")
    assert len(stamps) == saved["keyframes_mapped"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]  # no hidden staging folder
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again


class _TermInSecondWindow:
    """Test double: the ground-truth backbone; during its second window a SIGTERM arrives."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def predict(self, window):
        self.calls += 1
        if self.calls == 2:
            signal.raise_signal(signal.SIGTERM)
        return self.inner.predict(window)


def test_sigterm_does_not_wait_for_the_window_in_flight(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    backbone = _TermInSecondWindow(GroundTruthBackbone(gt))
    report = run_map(open_input(bench["bag"]), tmp_path / "o", _config(), backbone)
    assert report["stopped_by"] == "SIGTERM" and backbone.calls == 2
    assert report["mapper_stats"]["windows_mapped"] == 1  # the second window was abandoned
    stamps, _ = read_tum_trajectory(tmp_path / "o" / "trajectory.tum")
    assert len(stamps) == report["keyframes_mapped"] > 0


def test_sigterm_while_the_outputs_are_written_does_not_lose_them(bench, tmp_path, monkeypatch):
    from spark3r.mapping import Mapper

    real_save = Mapper.save

    def save_under_sigterm(self, directory):
        signal.raise_signal(signal.SIGTERM)  # e.g. `timeout` firing just as the run ends
        return real_save(self, directory)

    monkeypatch.setattr(Mapper, "save", save_under_sigterm)
    gt = load_tum_ground_truth(bench["tum"])
    report = run_map(open_input(bench["bag"]), tmp_path / "o", _config(), GroundTruthBackbone(gt))
    assert report["complete"] and (tmp_path / "o" / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_sigterm_to_the_command_leaves_partial_outputs_and_no_staging(tmp_path):
    """A real `spark3r map` process gets SIGTERM mid-run: exit 143, valid partial outputs."""
    paths = write_benchmark(tmp_path / "long", num_frames=150, height=48, width=64, seed=3)
    out = tmp_path / "runs" / "out"
    out.parent.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "spark3r", "map", str(paths["bag"]), "--out", str(out),
                             "--ground-truth", str(paths["tum"]), "--progress-interval", "0.001", *_params()],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = proc.stderr.readline()
        while "progress:" not in line:  # the run is mapping frames: stop it like `timeout` would
            assert line and time.monotonic() < deadline, f"no progress line; stderr: {line!r}"
            line = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "SIGTERM: stopping now" in stderr and "interrupted (partial outputs)" in stdout
    report = _strict_load(out / "report.json")
    assert report["interrupted"] and report["stopped_by"] == "SIGTERM" and report["frames"] < 150
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# -- progress ----------------------------------------------------------------------------------


def test_plain_progress_lines_are_rate_limited(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    stream = io.StringIO()
    run_map(open_input(bench["bag"]), tmp_path / "a", _config(), GroundTruthBackbone(gt), progress=stream,
            live_progress=False, progress_interval_s=3600)
    lines = stream.getvalue().splitlines()
    # Far below the interval: only the final line, no carriage returns (a log file stays readable).
    assert lines == [lines[-1]] and lines[0].startswith("spark3r map: progress: frames 16/16") and "\r" not in stream.getvalue()
    stream = io.StringIO()
    run_map(open_input(bench["bag"]), tmp_path / "b", _config(), GroundTruthBackbone(gt), progress=stream,
            live_progress=False, progress_interval_s=1e-6)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 17 and all(line.startswith("spark3r map: progress: frames ") for line in lines)
    with pytest.raises(ValueError, match="progress interval"):
        run_map(open_input(bench["bag"]), tmp_path / "c", _config(), GroundTruthBackbone(gt), progress=stream,
                live_progress=False, progress_interval_s=0)


class _FailingSecondWindow:
    """Test double: the ground-truth backbone, except that its second window raises."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def predict(self, window):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated backbone failure")
        return self.inner.predict(window)


def test_log_lines_never_land_on_the_live_progress_line(bench, tmp_path):
    gt = load_tum_ground_truth(bench["tum"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        report = run_map(open_input(bench["bag"]), tmp_path / "o", _config(), _FailingSecondWindow(GroundTruthBackbone(gt)),
                         progress=stream, live_progress=True)
    finally:
        root.removeHandler(handler)
    assert report["drops"]["backbone_errors"] == 1
    assert [a["outcome"] for a in report["window_attempts"]][:2] == ["mapped", "backbone_error"]
    text = stream.getvalue()
    visible = [line.split("\r")[-1] for line in text.split("\n")]  # what a terminal shows per line
    logged = [line for line in visible if "ERROR" in line]
    assert logged and all("frames " not in line for line in logged), logged
    assert any(line.startswith("[") and "frames 16/16" in line for line in visible)  # the status line is back
    assert not handler.filters  # the guard is removed after the run


# -- misleading errors -------------------------------------------------------------------------


def test_bag_folder_without_metadata_yaml(bench, tmp_path, capsys):
    mcap, = bench["bag"].glob("*.mcap")
    one = tmp_path / "one"
    one.mkdir()
    (one / mcap.name).write_bytes(mcap.read_bytes())
    source = open_input(one)  # a single storage file is read on its own
    assert source.kind == "bag" and len(list(source.frames())) == 16
    (one / "second.mcap").write_bytes(mcap.read_bytes())
    code = map_cli.main([str(one), "--out", str(tmp_path / "o"), "--ground-truth", str(bench["tum"]), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"bag folder {one} has no metadata.yaml" in err
    assert "second.mcap" in err and "pass a single .mcap/.db3 file" in err


@pytest.mark.parametrize("extra, flags", [
    (["--backbone", "vggt-tiny"], "--backbone"),
    (["--checkpoint", "seeded", "--reduction", "uniform"], "--checkpoint, --reduction"),
])
def test_ground_truth_with_model_options_is_an_error(bench, tmp_path, capsys, extra, flags):
    code = map_cli.main([str(bench["bag"]), "--out", str(tmp_path / "o"), "--ground-truth", str(bench["tum"]),
                         "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and f"--ground-truth replaces the model with a test double, so {flags} would be ignored" in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder_names_the_users_folder(bench, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "run"
    argv = [str(bench["bag"]), "--out", str(out), "--ground-truth", str(bench["tum"]), "--no-progress"]
    if os.geteuid() != 0:  # root may write anywhere: the real permission check cannot be exercised
        parent.chmod(0o500)
        try:
            assert map_cli.main(argv) == 2
        finally:
            parent.chmod(0o700)
        err = capsys.readouterr().err
        assert f"cannot create {out}: directory {parent} is not writable" in err and ".run." not in err
    # Test double for the file system: the staging folder cannot be created (read-only mount).
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == parent:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert map_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"spark3r map: error: cannot create {out}: Permission denied" in err and ".run." not in err


def test_a_full_disk_names_the_users_output_not_the_staging_folder(bench, tmp_path, capsys, monkeypatch):
    from spark3r.mapping import Mapper

    def disk_full(self, directory):  # test double for a full disk while the map is written
        raise OSError(28, "No space left on device", str(Path(directory) / "map.ply"))

    monkeypatch.setattr(Mapper, "save", disk_full)
    out = tmp_path / "run"
    code = map_cli.main([str(bench["bag"]), "--out", str(out), "--ground-truth", str(bench["tum"]), "--no-progress",
                         *_params()])
    err = capsys.readouterr().err
    assert code == 2 and f"spark3r map: error: cannot write {out / 'map.ply'}: No space left on device" in err
    assert ".run." not in err and list(tmp_path.iterdir()) == []
