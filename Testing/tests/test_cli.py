"""The ``fastsam3d`` command line on real files: Colin27 from Debian mricron-data, and broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model, save_model
from FastSAM3DLib.cli import main

TEMPLATES = Path("/usr/share/mricron/templates")
needs_colin27 = pytest.mark.skipif(not (TEMPLATES / "ch2.nii.gz").exists(), reason="Debian mricron-data (Colin27) is not installed")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(build_model("tiny"), path)
    return path


@needs_colin27
def test_segment_colin27_writes_mask_on_the_input_grid_and_json(model_path, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    png = tmp_path / "overlay.png"
    status = main([
        "segment", str(TEMPLATES / "ch2.nii.gz"), "--point", "20.4,-13.6,-5.2", "--negative", "28,-13,-5",
        "--model", str(model_path), "--out", str(out), "--png", str(png), "--json",
    ])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    image = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetSpacing(), image.GetSpacing())
    assert np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert np.allclose(mask.GetDirection(), image.GetDirection())
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    assert voxels > 0 and report["voxels"] == voxels
    assert report["volume_ml"] == pytest.approx(voxels / 1000.0)
    assert report["prompts"][1] == {"point_lps": [28.0, -13.0, -5.0], "positive": False}
    assert report["click_consistency"]["clicks"] == 2
    assert {"segment_s", "decode_s", "paste_s"} <= set(report["timings_s"])
    assert report["model"]["sha256"] and report["device"] == "cpu"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the positive click's voxel is inside, the negative one's outside
    array = sitk.GetArrayViewFromImage(mask)
    for point, value in (((20.4, -13.6, -5.2), 1), ((28.0, -13.0, -5.0), 0)):
        x, y, z = image.TransformPhysicalPointToIndex(point)
        assert array[z, y, x] == value


def test_demo_with_a_checkpoint_segments_the_sample(model_path, tmp_path, capsys):
    """The README's first command, given a checkpoint (an install without bundled weights): the mask
    on the sample's grid, the overlay, and the Dice against the sample's label."""
    out_dir = tmp_path / "demo"
    assert main(["demo", "--model", str(model_path), "--out-dir", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Dice against the atlas label:" in printed
    sample = sitk.ReadImage(str(Path(__file__).resolve().parents[2] / "Resources" / "Sample" / "colin27_t1.nii.gz"))
    mask = sitk.ReadImage(str(out_dir / "demo_mask.nii.gz"))
    assert mask.GetSize() == sample.GetSize() and np.allclose(mask.GetOrigin(), sample.GetOrigin())
    assert (out_dir / "demo_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --json: stdout is one JSON object, with the Dice in it; the narration goes to stderr.
    assert main(["demo", "--model", str(model_path), "--out-dir", str(out_dir), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert 0.0 <= report["dice_against_label"] <= 1.0 and report["output"] == str(out_dir / "demo_mask.nii.gz")
    assert "segmenting" in captured.err


def test_demo_without_bundled_weights_shows_the_campaigns_and_says_so(model_path, tmp_path, capsys, monkeypatch):
    """The README's first command works before bundled weights exist: with the training campaign's
    current file (here a stand-in), named as such."""
    import FastSAM3DLib.checkpoint as checkpoint
    import FastSAM3DLib.cli as cli

    monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: None)
    monkeypatch.setattr(cli, "CAMPAIGN_MODEL", model_path)
    assert main(["demo", "--out-dir", str(tmp_path / "demo"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "no bundled model in this install yet" in captured.err and "below the quality bar" in captured.err
    assert json.loads(captured.out)["output"] == str(tmp_path / "demo" / "demo_mask.nii.gz")


def test_demo_without_weights_or_with_a_file_as_folder_creates_nothing(tmp_path, capsys, monkeypatch):
    import FastSAM3DLib.checkpoint as checkpoint

    import FastSAM3DLib.cli as cli

    monkeypatch.setattr(checkpoint, "bundled_model_path", lambda: None)  # this install has none anyway; a later one may
    monkeypatch.setattr(cli, "CAMPAIGN_MODEL", tmp_path / "no-campaign.safetensors")  # an install without either
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out_dir)]) == 2
    assert "fastsam3d demo --model PATH" in capsys.readouterr().err and not out_dir.exists()
    assert main(["demo", "--model", str(tmp_path / "absent.pth"), "--out-dir", str(out_dir)]) == 2
    assert "absent.pth" in capsys.readouterr().err and not out_dir.exists()
    a_file = tmp_path / "x.nii.gz"
    a_file.write_bytes(b"mine")
    assert main(["demo", "--model", str(tmp_path / "absent.pth"), "--out-dir", str(a_file)]) == 2
    assert "--out-dir" in capsys.readouterr().err and a_file.read_bytes() == b"mine"


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _volume(values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.5, 1.5, 1.5))
    return image


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("constant", "same value"),
        ("outside", "outside the image"),
        ("unreadable", "not a readable image"),
        ("truncated", "truncated"),
        ("missing", "no such image"),
        ("bad_point", "expected 3 comma-separated numbers"),
        ("bad_out", "expected a file name ending in"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(case, message, model_path, tmp_path, capsys):
    rng = np.random.default_rng(0)
    values = rng.normal(100, 10, (30, 30, 30))
    image_path = tmp_path / "image.nrrd"
    point = "10,10,10"
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"precious existing output")
    if case in ("nan", "inf"):
        values[5, 6, 7] = np.nan if case == "nan" else np.inf
        _write(_volume(values), image_path)  # NRRD keeps NaN/Inf (NIfTI would turn NaN into 0)
    elif case == "constant":
        _write(_volume(np.full((30, 30, 30), 7.0)), image_path)
    elif case == "outside":
        _write(_volume(values), image_path)
        point = "500,10,10"
    elif case == "unreadable":
        image_path = tmp_path / "image.mha"
        image_path.write_bytes(b"not an image at all" * 10)
    elif case == "truncated":
        image_path = tmp_path / "image.nii.gz"
        _write(_volume(values), image_path)
        image_path.write_bytes(image_path.read_bytes()[: image_path.stat().st_size // 5])
    elif case == "missing":
        image_path = tmp_path / "absent.nii.gz"
    elif case == "bad_point":
        _write(_volume(values), image_path)
        point = "10,10"
    else:
        _write(_volume(values), image_path)
        out = tmp_path / "mask.txt"
    status = main(["segment", str(image_path), "--point", point, "--model", str(model_path), "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err
    if out.suffix != ".txt":
        assert out.read_bytes() == b"precious existing output"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--uncertainty", "{tmp}/u.nii.gz", "--uncertainty-n", "1"), "--uncertainty-n 1: needs at least 2"),
        (("--out", "{tmp}/mask.NII.GZ"), "in lower case (SimpleITK's NIfTI writer"),
        (("--ct-window", "-160"), "expected 2 comma-separated numbers like -160,240"),
        (("--ct-window", "-inf,100"), "expected 2 comma-separated numbers like -160,240"),
        (("--out", "{image}"), "is the input image"),
        (("--uncertainty", "{tmp}/mask.nii.gz"), "is also given as --out"),
        (("--png", "{tmp}/mask.nii.gz"), "expected a file name ending in one of .png"),
        (("--device", "gpu"), "--device gpu:"),
        (("--uncertainty-n", "32"), "give --uncertainty too"),  # was silently ignored (found by review)
        (("--uncertainty-method", "click-jitter"), "give --uncertainty too"),
        (("--threads", "-2"), "--threads -2: expected a number of threads"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_loaded_or_written(extra, message, model_path, tmp_path, capsys):
    """Each of these was an exit-1 "internal error" after the whole run, or silently overwrote a file."""
    image_path = _write(_volume(np.random.default_rng(0).normal(100, 10, (20, 20, 20))), tmp_path / "image.nrrd")
    original = image_path.read_bytes()
    values = [v.format(tmp=tmp_path, image=image_path) for v in extra]
    if "--out" not in values:
        values += ["--out", str(tmp_path / "mask.nii.gz")]
    status = main(["segment", str(image_path), "--point", "10,10,10", "--model", str(model_path), *values])
    assert status == 2, capsys.readouterr().err
    assert message in capsys.readouterr().err
    assert image_path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nrrd"]


def test_abbreviated_options_take_negative_values(model_path, tmp_path):
    image = _volume(np.random.default_rng(0).normal(size=(20, 20, 20)))
    image.SetOrigin((-30.0, -30.0, -30.0))
    image_path = _write(image, tmp_path / "image.nrrd")
    out = tmp_path / "mask.nii.gz"
    status = main(["segment", str(image_path), "--poi", "-20,-20.5,-15", "--neg", "-25,-22,-18", "--ct", "-100,200",
                   "--model", str(model_path), "--out", str(out), "--json"])
    assert status == 0 and out.exists()


def test_a_folder_without_dicom_gets_our_error_only(model_path, tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    status = main(["segment", str(tmp_path / "empty"), "--point", "1,2,3", "--model", str(model_path), "--out", str(tmp_path / "m.nii.gz")])
    err = capfd.readouterr().err
    assert status == 2 and "holds no DICOM series" in err
    assert "WARNING" not in err and "itk" not in err.lower()  # ITK's own warning used to be printed first


def test_convert_checkpoint_replaces_nothing_unless_the_result_loads(model_path, tmp_path, capsys):
    """A conversion that yields no complete model leaves an existing OUT and its checksum as they were,
    says which input is at fault, and leaves nothing behind; a good one replaces them."""
    from FastSAM3DLib.checkpoint import load_model

    out = tmp_path / "keep.safetensors"
    assert main(["convert-checkpoint", str(model_path), str(out)]) == 0
    kept, kept_sum = out.read_bytes(), (tmp_path / "keep.safetensors.sha256").read_text()
    not_a_model = tmp_path / "notmodel.pth"
    torch.save({"a": torch.zeros(3)}, not_a_model)
    capsys.readouterr()
    assert main(["convert-checkpoint", str(not_a_model), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{not_a_model}: converted, but the weights are not a complete model: missing key" in err
    assert out.read_bytes() == kept and (tmp_path / "keep.safetensors.sha256").read_text() == kept_sum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors", "keep.safetensors.sha256", "notmodel.pth"]
    assert main(["convert-checkpoint", str(not_a_model), str(tmp_path / "absent" / "o.safetensors")]) == 2
    assert "its folder" in capsys.readouterr().err and not (tmp_path / "absent").exists()
    # A good conversion over an existing file: the new weights, and a checksum that names OUT.
    torch.manual_seed(5)
    other = tmp_path / "other.pth"
    torch.save(build_model("tiny").state_dict(), other)
    assert main(["convert-checkpoint", str(other), str(out)]) == 0
    assert out.read_bytes() != kept and (tmp_path / "keep.safetensors.sha256").read_text().endswith("  keep.safetensors\n")
    load_model(out, device="cpu")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_decoder_given_with_a_whole_model_is_refused(model_path, tmp_path, capsys):
    image_path = _write(_volume(np.random.default_rng(0).normal(100, 10, (20, 20, 20))), tmp_path / "image.nrrd")
    status = main(["segment", str(image_path), "--point", "10,10,10", "--model", str(model_path),
                   "--decoder", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "m.nii.gz")])
    assert status == 2 and "already holds a whole model" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_a_random_file_as_model_says_what_it_is_not(tmp_path):
    from FastSAM3DLib.checkpoint import CheckpointError, load_model

    bad = tmp_path / "foo.txt"
    bad.write_text("this is not a model\n")
    with pytest.raises(CheckpointError, match=r"foo.txt: not a PyTorch checkpoint \(.pth/.pt\) nor a safetensors file.*reading it stopped with"):
        load_model(bad)


def test_info_reports_a_checksum_mismatch(model_path, tmp_path, capsys):
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(model_path.read_bytes())
    (tmp_path / "m.safetensors.sha256").write_text("0" * 64 + "  m.safetensors\n")
    assert main(["info", "--json", "--model", str(copy)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["checksum_verified"] is False and "sha256" in report["model"]["error"]


def test_bad_model_exits_2(tmp_path, capsys):
    image_path = tmp_path / "image.nrrd"
    _write(_volume(np.random.default_rng(0).normal(size=(20, 20, 20))), image_path)
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"\x00" * 100)
    status = main(["segment", str(image_path), "--point", "5,5,5", "--model", str(bad), "--out", str(tmp_path / "m.nii.gz")])
    assert status == 2
    assert "model.pth" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_info_reports_backends_and_model(model_path, capsys):
    assert main(["info", "--json", "--model", str(model_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention_backend"] in report["attention_backends_available"]
    assert report["model"]["sha256"] and report["model"]["checksum_verified"] is True
    assert report["torch"] == torch.__version__


def test_negative_coordinates_need_no_equals_sign(model_path, tmp_path):
    image = _volume(np.random.default_rng(0).normal(size=(20, 20, 20)))
    image.SetOrigin((-30.0, -30.0, -30.0))
    image_path = _write(image, tmp_path / "image.nrrd")
    out = tmp_path / "mask.nii.gz"
    status = main(["segment", str(image_path), "--point", "-20,-20.5,-15", "--negative", "-25,-22,-18",
                   "--ct-window", "-100,200", "--model", str(model_path), "--out", str(out)])
    assert status == 0 and out.exists()


def test_candidate_of_a_lone_click(tmp_path, capsys):
    """--candidate shows another candidate mask of a single click; where there is none to choose,
    the command exits 2 and writes nothing."""
    torch.manual_seed(0)
    model = build_model("tiny")
    model.config["first_click_multimask"] = True
    model_path = tmp_path / "candidates.safetensors"
    save_model(model, model_path)
    image_path = _write(_volume(np.random.default_rng(0).normal(100, 10, (30, 30, 30))), tmp_path / "image.nrrd")

    def segment(*extra):
        status = main(["segment", str(image_path), "--model", str(model_path), "--json", *extra])
        captured = capsys.readouterr()
        return status, (json.loads(captured.out) if status == 0 else captured.err)

    status, picked = segment("--point", "20,20,20", "--out", str(tmp_path / "picked.nii.gz"))
    ious = picked["candidates"]["predicted_iou"]
    assert status == 0 and len(ious) == 3 and picked["candidates"]["shown"] is None
    assert picked["predicted_iou"] == pytest.approx(max(ious))
    other = int(np.argmin(ious))
    status, chosen = segment("--point", "20,20,20", "--candidate", str(other), "--out", str(tmp_path / "chosen.nii.gz"))
    assert status == 0 and chosen["candidates"] == {"predicted_iou": ious, "shown": other}
    assert chosen["predicted_iou"] == pytest.approx(ious[other])

    out = tmp_path / "refused.nii.gz"
    for extra, message in ((("--point", "20,20,20", "--candidate", "3"), "candidate 3 does not exist"),
                           (("--point", "20,20,20", "--point", "22,20,20", "--candidate", "0"), "masks of a lone first click")):
        status, error = segment(*extra, "--out", str(out))
        assert status == 2 and message in error
        assert not out.exists()


def test_a_voxel_box_on_an_oblique_grid_keeps_every_voxel_of_the_box(model_path, tmp_path, capsys):
    """Found by review: ``--voxel --box`` took the LPS box between the two corners' centres, which on
    a grid rotated 45 degrees is flat (refused) or leaves out most of the voxel box."""
    array = np.random.default_rng(0).normal(100, 10, (20, 40, 40)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    c = s = np.sqrt(0.5)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    status = main(["segment", str(path), "--voxel", "--box", "10,14,5,22,26,13", "--model", str(model_path),
                   "--out", str(tmp_path / "m.nrrd"), "--json"])
    assert status == 0
    low, high = (np.asarray(v) for v in json.loads(capsys.readouterr().out)["prompts"][0]["box_lps"])
    for index in np.ndindex(2, 2, 2):  # every corner voxel of the box given lies in the box used
        corner = np.where(index, (22, 26, 13), (10, 14, 5))
        point = np.asarray(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in corner)))
        assert np.all(point >= low - 1e-6) and np.all(point <= high + 1e-6)
