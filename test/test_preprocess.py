"""Image preprocessing: the official "crop" / "pad" geometry, white padding, RGBA, inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spark3r.models.preprocess import list_images, load_images, preprocess_image, target_size_for


def solid(width: int, height: int, rgb=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), rgb)


def test_crop_landscape_4_3_gives_518x392():
    out = preprocess_image(solid(640, 480))
    assert out.shape == (3, 392, 518) and out.dtype == torch.float32
    assert torch.allclose(out[:, 5:-5, 5:-5], torch.tensor([1.0, 0.0, 0.0])[:, None, None])


def test_crop_portrait_is_centre_cropped_to_518():
    # 480x640 -> 518 x round(640*518/480/14)*14 = 518 x 686, then rows 84..602 are kept.
    img = np.zeros((640, 480, 3), dtype=np.uint8)
    img[:320] = 255  # top half white, bottom half black
    out = preprocess_image(img)
    assert out.shape == (3, 518, 518)
    boundary_row = 686 // 2 - 84  # where the white/black edge lands after cropping
    assert out[:, boundary_row - 5].min() > 0.99 and out[:, boundary_row + 5].max() < 0.01


def test_pad_landscape_and_portrait_pad_with_white():
    land = preprocess_image(solid(640, 480, (0, 0, 0)), mode="pad")
    assert land.shape == (3, 518, 518)
    pad = (518 - 392) // 2
    assert torch.all(land[:, :pad] == 1.0) and torch.all(land[:, -pad:] == 1.0)
    assert land[:, pad + 2 : -pad - 2].max() < 0.01
    port = preprocess_image(solid(480, 640, (0, 0, 0)), mode="pad")
    assert port.shape == (3, 518, 518)
    assert torch.all(port[:, :, :63] == 1.0) and torch.all(port[:, :, -63:] == 1.0)  # width 392 centred


def test_target_sizes_follow_the_official_rounding():
    assert target_size_for(640, 480) == (518, 392)
    assert target_size_for(1920, 1080) == (518, 294)  # 291.4 -> 21 patches
    assert target_size_for(480, 640, "pad") == (392, 518)
    assert target_size_for(1000, 1000, "pad") == (518, 518)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    out = preprocess_image(rgba, target_size=28)
    assert torch.all(out == 1.0)


def test_resize_is_bicubic_like_pil():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(arr).resize((112, 84), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    out = preprocess_image(arr, target_size=112)
    assert out.shape == (3, 84, 112)
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)


def test_float_arrays_and_grayscale():
    gray = np.full((30, 40), 0.5, dtype=np.float32)
    out = preprocess_image(gray, target_size=56)
    assert out.shape == (3, 42, 56)
    assert torch.allclose(out, torch.full_like(out, 128 / 255))


def test_folder_loading_sorted_and_mixed_sizes_padded(tmp_path):
    solid(64, 48, (0, 0, 0)).save(tmp_path / "b.png")
    solid(48, 64, (0, 0, 0)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    batch = load_images(tmp_path, mode="crop", target_size=56)
    # a: 56 x 74.7 -> 70 rows > 56 -> cropped to 56x56; b: 56 x 42. Padded to 56 x 56.
    assert batch.shape == (2, 3, 56, 56)
    assert torch.all(batch[1, :, :7] == 1.0) and torch.all(batch[1, :, -7:] == 1.0)
    assert batch[0].max() < 0.01


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: preprocess_image(solid(10, 10), mode="stretch"), ValueError, "mode"),
        (lambda: preprocess_image(solid(10, 10), target_size=500), ValueError, "multiple of 14"),
        (lambda: preprocess_image(np.zeros((5, 5, 2), np.uint8)), ValueError, "shape"),
        (lambda: preprocess_image(np.full((5, 5), 2.0)), ValueError, r"\[0, 1\]"),
        (lambda: preprocess_image(np.zeros((5, 5), np.int32)), TypeError, "uint8"),
        (lambda: preprocess_image(42), TypeError, "image path"),
        (lambda: preprocess_image("/nonexistent/img.png"), ValueError, "cannot read"),
        (lambda: load_images([]), ValueError, "at least one"),
    ],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_images(tmp_path)


def test_folder_to_poses_and_point_cloud(tmp_path):
    """The README route: folder of JPEGs -> poses (c2w) and a coloured point cloud."""
    from golden_utils import seeded_state_dict
    from spark3r.models import build_model, load_weights
    from spark3r.models.camera import extrinsics_to_c2w, pose_encoding_to_extrinsics_intrinsics, unproject_depth

    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.jpg")
    model = build_model("vggt-tiny", device="meta")
    model = load_weights(model, seeded_state_dict(model))

    images = load_images(tmp_path, target_size=56)
    with torch.inference_mode():
        pred = model(images, heads=("camera", "depth"))
    extrinsics, intrinsics = pose_encoding_to_extrinsics_intrinsics(pred["pose_enc"], images.shape[-2:])
    poses = extrinsics_to_c2w(extrinsics)[0]
    points = unproject_depth(pred["depth"], extrinsics, intrinsics)[0]
    conf = pred["depth_conf"][0]
    keep = conf >= conf.median()
    cloud, colors = points[keep], images.permute(0, 2, 3, 1)[keep]

    assert images.shape == (3, 3, 42, 56)
    assert poses.shape == (3, 4, 4) and points.shape == (3, 42, 56, 3)
    assert cloud.shape[1] == 3 and colors.shape == cloud.shape and len(cloud) >= conf.numel() // 2
    # The camera-frame z of every unprojected point is the predicted depth.
    cam = (extrinsics[0, :, None, None, :, :3] @ points[..., None])[..., 0] + extrinsics[0, :, None, None, :, 3]
    finite = torch.isfinite(cam).all(-1)
    torch.testing.assert_close(cam[..., 2][finite], pred["depth"][0, ..., 0][finite], rtol=1e-4, atol=1e-4)
