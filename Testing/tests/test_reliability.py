"""Hostile checkpoints and broken or awkward volumes: refused with a specific error, or segmented correctly.

Checkpoints: what ``test_checkpoint.py`` does not already cover — safetensors files whose header lies
(about offsets, shapes, its own length, or the architecture in its metadata), zip archives with an
extra or swapped pickle, TorchScript archives, 2D (wrong-architecture) and NaN weights, and the
command line refusing a code-running ``--model`` (checked with a marker file the payload would create).

Volumes: every file format SimpleITK would silently zero-fill when cut off is checked to be refused
by ``io.read_image``; NaN/Inf (NRRD/MHA keep them; NIfTI would turn NaN into 0), constant, empty, 2D,
4D and vector images are refused by the session and by the command line (exit 2, nothing written,
an existing output untouched); tiny, extremely fine or coarse, and oblique volumes are segmented, and
segmented *correctly*: a decoder replaced by a half-space oracle has a known exact answer in any
geometry, because trilinear interpolation reproduces a linear function exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import CheckpointError, ImageError, Session, build_model, load_model, save_model
from FastSAM3DLib.cli import main
from FastSAM3DLib.io import read_image
from FastSAM3DLib.preprocess import CANONICAL_DIRECTION, CropGrid, image_affine, index_to_physical

REPO = Path(__file__).resolve().parents[2]


def _tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def _volume(size=(30, 30, 30), dtype=np.float32, spacing=(1.5, 1.5, 1.5), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(100, 10, size[::-1])
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(spacing)
    return image


# ============================================================================== hostile checkpoints


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _safetensors_parts(path: Path):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_safetensors(path: Path, header: dict, body: bytes, declared_length=None) -> Path:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if declared_length is None else declared_length) + text + body)
    return path


@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "good.safetensors"
    save_model(_tiny(), path)
    (path.parent / "good.safetensors.sha256").unlink()  # the lies below would otherwise fail the checksum first
    return path


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("lie", ["offset_beyond_end", "shape_too_big", "header_length", "overlapping", "not_json"])
def test_safetensors_with_a_lying_header_is_refused(lie, good_safetensors, tmp_path):
    header, body = _safetensors_parts(good_safetensors)
    first = _first_tensor(header)
    declared = None
    if lie == "offset_beyond_end":
        header[first]["data_offsets"][1] += 10**9
    elif lie == "shape_too_big":
        header[first]["shape"] = [10**6, 10**6]  # 4 TB if anyone believed it
    elif lie == "header_length":
        declared = 10**7
    elif lie == "overlapping":
        second = [k for k in header if k not in ("__metadata__", first)][0]
        header[second]["data_offsets"] = header[first]["data_offsets"]
    path = tmp_path / "lying.safetensors"
    if lie == "not_json":
        path.write_bytes(struct.pack("<Q", 16) + b"{not json......." + bytes(64))
    else:
        _write_safetensors(path, header, body, declared)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path, device="cpu")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"embed_dim": 100_000}, r"do not match the model architecture(?s:.*)model \(400000,\)"),
        ({"embed_dim": "wide"}, "unsupported architecture"),
        ({"block_kinds": ["mlp"] * 100_000}, "metadata has 100000 encoder blocks, its weights 3"),
        ({"block_kinds": ["mlp", "mlp", "teleport"]}, "unknown block kind 'teleport'"),
        ({"decoder_heads": 7}, "7 heads do not divide"),
        ({"decoder_dropout": 5}, "dropout probability"),
        ({"img_size": 4096}, "do not match the model architecture"),
    ],
)
def test_architecture_claimed_by_metadata_is_checked_before_anything_is_allocated(config, message, good_safetensors, tmp_path):
    """The metadata's architecture is built on the meta device and compared with the weights first:
    before, a 100000-wide claim tried to allocate 160 GB and a 100000-block one took 10 GB."""
    header, body = _safetensors_parts(good_safetensors)
    claimed = {**json.loads(header["__metadata__"]["config"]), **config}
    header["__metadata__"]["config"] = json.dumps(claimed)
    path = _write_safetensors(tmp_path / "claims.safetensors", header, body)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, device="cpu")


_PEAK_CHILD = r"""
import sys
sys.path.insert(0, {repo!r})
from FastSAM3DLib import CheckpointError, load_model
try:
    load_model({path!r}, device="cpu")
except CheckpointError:
    pass
fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(int(fields["VmHWM"].split()[0]) * 1024)
"""


def test_a_huge_claimed_architecture_costs_no_memory(good_safetensors, tmp_path):
    header, body = _safetensors_parts(good_safetensors)
    header["__metadata__"]["config"] = json.dumps(
        {**json.loads(header["__metadata__"]["config"]), "block_kinds": ["mlp"] * 100_000, "embed_dim": 48}
    )
    path = _write_safetensors(tmp_path / "claims.safetensors", header, body)
    child = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD.format(repo=str(REPO), path=str(path))], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr
    assert int(child.stdout.split()[-1]) < 1.5e9  # imports ~0.4 GB; believing the claim took 10 GB


def _zip_copy(source: Path, destination: Path, replace=None, extra=None) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(destination, "w") as zout:
        names = zin.namelist()
        for name in names:
            data = zin.read(name)
            if replace and name.endswith("/data.pkl"):
                data = replace
            zout.writestr(name, data)
        if extra:
            zout.writestr(names[0].split("/")[0] + "/" + extra[0], extra[1])
    return destination


@pytest.fixture()
def good_pth(tmp_path) -> Path:
    path = tmp_path / "good.pth"
    torch.save({"model_state_dict": _tiny().state_dict()}, path)
    return path


def test_an_extra_pickle_inside_the_zip_is_never_unpickled(good_pth, tmp_path):
    marker = tmp_path / "pwned"
    path = _zip_copy(good_pth, tmp_path / "extra.pth", extra=("evil.pkl", pickle.dumps(_RunsCode(marker), protocol=2)))
    model = load_model(path, device="cpu")  # torch only reads data.pkl: the weights load, the payload stays inert
    assert not marker.exists()
    assert torch.equal(model.state_dict()["image_encoder.pos_embed"], _tiny().state_dict()["image_encoder.pos_embed"])


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_swapped_data_pickle_is_refused_without_running_it(protocol, good_pth, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model_state_dict": _RunsCode(marker)}, protocol=protocol)
    path = _zip_copy(good_pth, tmp_path / "swapped.pth", replace=payload)
    with pytest.raises(CheckpointError, match="refused|not a PyTorch checkpoint"):
        load_model(path, device="cpu")
    assert not marker.exists()


def test_a_torchscript_archive_is_refused(tmp_path):
    class Module(torch.nn.Module):
        def forward(self, x):
            return x + 1

    path = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(Module()), str(path))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="TorchScript"):
        load_model(path, device="cpu")


def test_a_2d_sam_checkpoint_is_a_wrong_architecture(tmp_path):
    """The same keys with 2D shapes (one spatial axis fewer), as a 2D SAM checkpoint would have."""
    state = {}
    for key, value in _tiny().state_dict().items():
        if value.ndim == 5:
            value = value[..., 0] if "weight" in key else value[:, 0]
        if key == "image_encoder.pos_embed":
            value = value[:, 0]
        state[key] = value.clone()
    path = tmp_path / "sam2d.pth"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match="sam2d.pth"):
        load_model(path, device="cpu")


def test_nan_weights_are_refused(tmp_path):
    state = {k: v.clone() for k, v in _tiny().state_dict().items()}
    state["mask_decoder.iou_token.weight"][0, 0] = float("nan")
    state["image_encoder.blocks.0.mlp.lin1.weight"][1, 1] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"2 weight tensors hold NaN or infinite values.*iou_token"):
        load_model(path, device="cpu")


@pytest.mark.parametrize("how", ["pickle_in_zip", "bare_pickle", "safetensors_named_pth"])
def test_segment_with_a_hostile_model_exits_2_without_running_code(how, tmp_path, capsys):
    marker = tmp_path / "pwned"
    model = tmp_path / "hostile.pth"
    if how == "pickle_in_zip":
        torch.save({"model_state_dict": _tiny().state_dict(), "payload": _RunsCode(marker)}, model)
    elif how == "bare_pickle":
        model.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:  # a safetensors file cannot carry code, but a lying one must still fail cleanly
        save_model(_tiny(), tmp_path / "st.safetensors")
        header, body = _safetensors_parts(tmp_path / "st.safetensors")
        header[_first_tensor(header)]["data_offsets"][1] += 999
        _write_safetensors(model, header, body)
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(_volume(), str(image))
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"existing")
    status = main(["segment", str(image), "--point", "10,10,10", "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert "hostile.pth" in err and "Traceback" not in err
    assert not marker.exists()
    assert out.read_bytes() == b"existing"


# ============================================================================== truncated and corrupt files

# Every format SimpleITK writes that a user might hand us, as (file name, compress).
FORMATS = [
    ("image.nii", False), ("image.nii.gz", True), ("image.mha", False), ("image.mha", True),
    ("image.nrrd", False), ("image.nrrd", True), ("image.mhd", False), ("image.mhd", True),
    ("image.nhdr", False), ("image.nhdr", True), ("image.hdr", False), ("image.gipl", False),
    ("image.gipl.gz", True), ("image.vtk", False),
]


def _data_file(folder: Path, name: str) -> Path:
    """The file holding the voxels (the separate .raw/.img for detached-header formats)."""
    header = folder / name
    others = [p for p in folder.iterdir() if p != header]
    return others[0] if name.endswith((".mhd", ".nhdr", ".hdr")) and others else header


@pytest.mark.parametrize("name, compress", FORMATS, ids=[f"{n}{'-compressed' if c else ''}" for n, c in FORMATS])
@pytest.mark.parametrize("keep", [0.06, 0.5, 0.995])
def test_truncated_files_are_refused_in_every_format(name, compress, keep, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    image = _volume(size=(31, 29, 33))
    sitk.WriteImage(image, str(folder / name), compress)
    assert np.array_equal(sitk.GetArrayFromImage(read_image(folder / name)), sitk.GetArrayFromImage(image))
    data = _data_file(folder, name)
    content = data.read_bytes()
    data.write_bytes(content[: int(len(content) * keep)])
    with pytest.raises(ImageError, match=r"truncated|not a readable image|could not be read"):
        read_image(folder / name)


def test_a_few_missing_bytes_of_an_uncompressed_nifti_are_noticed(tmp_path):
    """Fewer bytes missing than the header's size: a check on the voxel bytes alone missed this."""
    path = tmp_path / "image.nii"
    sitk.WriteImage(_volume(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ImageError, match="truncated"):
        read_image(path)


def test_gzip_of_a_short_nifti_is_refused(tmp_path):
    """A complete, valid gzip stream whose content is a cut-off NIfTI file."""
    raw = tmp_path / "image.nii"
    sitk.WriteImage(_volume(), str(raw))
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw.read_bytes()[:20000]))
    with pytest.raises(ImageError, match="truncated.*after decompression"):
        read_image(path)


def test_flipped_bits_in_a_gzip_stream_are_refused(tmp_path):
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(_volume(), str(path), True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        read_image(path)


def test_ct_nifti_with_a_scaling_intercept_is_not_mistaken_for_truncated(tmp_path):
    """Stored int16 with scl_inter = -1024 (as CT converters write): read as float32, twice the bytes."""
    array = np.random.default_rng(0).integers(0, 2000, (20, 21, 22)).astype(np.int16)
    path = tmp_path / "ct.nii"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    header = bytearray(path.read_bytes())
    header[112:120] = struct.pack("<ff", 1.0, -1024.0)  # scl_slope, scl_inter
    path.write_bytes(bytes(header))
    image = read_image(path)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(image), array.astype(np.float32) - 1024)
    gz = tmp_path / "ct.nii.gz"
    gz.write_bytes(gzip.compress(bytes(header)))
    assert np.array_equal(sitk.GetArrayFromImage(read_image(gz)), array.astype(np.float32) - 1024)


def test_an_uncompressed_file_named_nii_gz_is_read(tmp_path):
    raw = tmp_path / "image.nii"
    sitk.WriteImage(_volume(), str(raw))
    misnamed = tmp_path / "image.nii.gz"
    misnamed.write_bytes(raw.read_bytes())
    assert read_image(misnamed).GetSize() == (30, 30, 30)


def test_truncated_metaimage_message_is_not_a_misleading_errno(tmp_path):
    path = tmp_path / "image.mha"
    sitk.WriteImage(_volume(), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ImageError) as error:
        read_image(path)
    assert "No such file or directory" not in str(error.value)
    assert "could not be read completely" in str(error.value)


# ============================================================================== broken volumes: session and CLI


def _with_value(value: float, dtype=np.float32) -> sitk.Image:
    array = sitk.GetArrayFromImage(_volume(dtype=dtype))
    array[5, 6, 7] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 1.5))
    return image


BROKEN = {
    # name: (how to make it, file name, message)
    "nan_nrrd": (lambda: _with_value(np.nan), "image.nrrd", "NaN or infinite"),
    "nan_mha": (lambda: _with_value(np.nan), "image.mha", "NaN or infinite"),
    "inf_nrrd": (lambda: _with_value(np.inf), "image.nrrd", "NaN or infinite"),
    "-inf_mha_float64": (lambda: _with_value(-np.inf, np.float64), "image.mha", "NaN or infinite"),
    "constant": (lambda: _volume() * 0 + 7, "image.nrrd", "every voxel has the same value"),
    "all_zero_uint8": (lambda: sitk.Image([20, 20, 20], sitk.sitkUInt8), "image.nii.gz", "every voxel has the same value"),
    "single_voxel": (lambda: _volume(size=(1, 1, 1)), "image.nrrd", "every voxel has the same value"),
    "2d": (lambda: sitk.GetImageFromArray(np.random.default_rng(0).random((20, 30)).astype(np.float32)), "image.nrrd", "expected a 3D volume, got a 2D image"),
    "2d_rgb_png": (lambda: sitk.GetImageFromArray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8), isVector=True), "image.png", "expected a 3D volume, got a 2D image"),
    "4d": (lambda: sitk.GetImageFromArray(np.random.default_rng(0).random((3, 10, 11, 12)).astype(np.float32), isVector=False), "image.nii.gz", "expected a 3D volume, got a 4D image"),
    "vector": (lambda: sitk.GetImageFromArray(np.random.default_rng(0).random((10, 11, 12, 3)).astype(np.float32), isVector=True), "image.nrrd", "single-channel"),
    "rgb_3d": (lambda: sitk.GetImageFromArray((np.random.default_rng(0).random((10, 11, 12, 3)) * 255).astype(np.uint8), isVector=True), "image.nrrd", "single-channel"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_volumes_are_refused_by_the_session(case, tiny_model):
    make, _, message = BROKEN[case]
    session = Session(tiny_model, prefetch=False)
    with pytest.raises(ImageError, match=message):
        session.set_image(make())
    with pytest.raises(RuntimeError, match="no image is set"):
        session.predict()


def test_an_empty_volume_is_refused(tiny_model):
    with pytest.raises(ImageError, match="empty"):
        Session(tiny_model, prefetch=False).set_image(sitk.Image([0, 10, 10], sitk.sitkFloat32))


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(_tiny(), path)
    return path


def _crafted_nrrd(path: Path, fields: str, data: bytes = b"") -> Path:
    path.write_bytes(b"NRRD0004\ntype: float\nencoding: raw\nendian: little\n" + fields.encode() + b"\n" + data)
    return path


CLI_ONLY = {
    "zero_size_nrrd": (lambda p: _crafted_nrrd(p / "image.nrrd", "dimension: 3\nsizes: 0 10 10\n"), "size is zero"),
    "singular_direction": (lambda p: _crafted_nrrd(
        p / "image.nrrd", "dimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
        "space directions: (1,0,0) (1,0,0) (0,0,1)\n", np.random.default_rng(0).random(64).astype("<f4").tobytes()), "determinant is 0"),
    "random_bytes_nii": (lambda p: (p / "image.nii").write_bytes(os.urandom(5000)) and p / "image.nii", "not a readable image"),
    "empty_file": (lambda p: (p / "image.nii.gz").write_bytes(b"") or p / "image.nii.gz", "the file is empty"),
    "truncated_nii": (lambda p: _truncated(p / "image.nii", 0.7), "truncated"),
    "truncated_mha": (lambda p: _truncated(p / "image.mha", 0.7), "could not be read completely"),
    "truncated_nrrd_gz": (lambda p: _truncated(p / "image.nrrd", 0.7, compress=True), "not a readable image"),
    "folder_without_dicom": (lambda p: (p / "scans").mkdir() or p / "scans", "no DICOM series"),
}


def _truncated(path: Path, keep: float, compress: bool = False) -> Path:
    sitk.WriteImage(_volume(), str(path), compress)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("case", sorted(BROKEN) + sorted(CLI_ONLY))
def test_broken_volumes_exit_2_and_write_nothing(case, cli_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    if case in BROKEN:
        make, name, message = BROKEN[case]
        image_path = folder / name
        sitk.WriteImage(make(), str(image_path))
    else:
        build, message = CLI_ONLY[case]
        image_path = build(folder)
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    out = out_folder / "mask.nii.gz"
    out.write_bytes(b"the segmentation from yesterday")
    status = main(["segment", str(image_path), "--point", "5,5,5", "--model", str(cli_model), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert message in captured.err
    assert str(image_path) in captured.err  # the message names the file
    assert captured.out == ""  # no JSON for a failed run
    assert out.read_bytes() == b"the segmentation from yesterday"
    assert sorted(p.name for p in out_folder.iterdir()) == ["mask.nii.gz"]


# ============================================================================== awkward volumes segmented correctly


class _HalfSpaceDecoder(torch.nn.Module):
    """Stands in for the mask decoder: logits = offset - normal . (x - first click) in millimetres.

    The function is linear in the crop's coordinates, so trilinear interpolation reproduces it exactly
    wherever a voxel lies within the hull of the 32^3 logit cell centres: there the correct mask is
    known in closed form for any user geometry, spacing or orientation.
    """

    def __init__(self, normal: np.ndarray, offset_mm: float, low_res: int = 32, crop_size: int = 128, spacing: float = 1.5):
        super().__init__()
        self.normal = torch.tensor(normal / np.linalg.norm(normal), dtype=torch.float64)
        self.offset = offset_mm
        self.low_res, self.scale, self.spacing = low_res, crop_size / low_res, spacing
        self.click = None

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output=False):
        cells = torch.stack(torch.meshgrid(*[torch.arange(self.low_res, dtype=torch.float64)] * 3, indexing="ij"), -1)
        crop_index = (cells + 0.5) * self.scale - 0.5
        offset_mm = (crop_index - self.click) * self.spacing * torch.tensor(np.diag(CANONICAL_DIRECTION))
        logits = (self.offset - offset_mm @ self.normal).float()
        batch = sparse_prompt_embeddings.shape[0]
        return logits.expand(batch, 1, -1, -1, -1).clone(), torch.ones(batch, 1)


def _half_space_model(normal, offset_mm):
    model = _tiny()
    oracle = _HalfSpaceDecoder(np.asarray(normal, dtype=np.float64), offset_mm)
    original = model.decode

    def decode(embedding, coords, labels, mask_logits=None, multimask_output=False):
        oracle.click = coords[0, 0].double()
        return original(embedding, coords, labels, mask_logits, multimask_output)

    model.mask_decoder = oracle
    model.decode = decode
    return model


def _rotation(seed: int) -> tuple:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    return tuple(q.flatten())  # a random rotation (possibly with a flip: det -1 allowed)


AWKWARD = {
    # name: (size, spacing, direction, click index, offset_mm)
    "tiny_5": ((5, 5, 5), (1.0, 1.0, 1.0), None, (2, 2, 2), 1.0),
    "tiny_2x3x4": ((2, 3, 4), (1.0, 1.0, 1.0), None, (1, 1, 2), 0.6),
    "single_slice": ((60, 50, 1), (0.8, 0.8, 5.0), None, (30, 25, 0), 6.0),
    "fine_0.05mm": ((40, 40, 40), (0.05, 0.05, 0.05), None, (20, 20, 20), 0.4),
    "coarse_20mm": ((30, 30, 30), (20.0, 20.0, 20.0), None, (15, 15, 15), 30.0),
    "anisotropic_0.05x20": ((40, 40, 12), (0.05, 0.05, 20.0), None, (20, 20, 6), 0.5),
    "oblique": ((40, 36, 30), (0.9, 1.3, 2.2), _rotation(1), (20, 18, 15), 8.0),
    "oblique_flipped_fine": ((40, 40, 40), (0.05, 0.07, 0.05), _rotation(2), (20, 20, 20), 0.3),
    "oblique_coarse": ((24, 24, 20), (20.0, 15.0, 20.0), _rotation(3), (12, 12, 10), 25.0),
}


@pytest.mark.parametrize("case", sorted(AWKWARD))
def test_awkward_volumes_are_segmented_correctly(case):
    size, spacing, direction, click_index, offset_mm = AWKWARD[case]
    image = _volume(size=size, spacing=spacing)
    if direction is not None:
        image.SetDirection(direction)
    image.SetOrigin((12.5, -40.0, 7.25))
    normal = np.random.default_rng(len(case)).normal(size=3)
    normal /= np.linalg.norm(normal)
    # The logits alone: the exact answer below is the plane's (the boundary refinement would move
    # it toward the random intensities' edges; it is tested in test_speed_modes.py).
    session = Session(_half_space_model(normal, offset_mm), prefetch=False, refinement=None)
    session.set_image(image)
    click = index_to_physical(image, click_index)
    session.add_point(click)
    mask = session.predict()
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin() and mask.GetDirection() == image.GetDirection()
    array = sitk.GetArrayFromImage(mask).astype(bool)

    # The exact answer, voxel by voxel, from physical positions.
    zs, ys, xs = np.indices(array.shape)
    index = np.stack([xs, ys, zs], -1).reshape(-1, 3).astype(np.float64)
    matrix, origin = image_affine(image)
    physical = index @ matrix.T + origin
    signed = offset_mm - (physical - click) @ normal
    crop = CropGrid.around(click)
    crop_index = crop.to_index(physical)
    cell_hull = np.all((crop_index >= 1.5) & (crop_index <= crop.size - 2.5), axis=1)  # exact trilinear zone
    outside_crop = np.any((crop_index < -0.5) | (crop_index > crop.size - 0.5), axis=1)
    decided = cell_hull & (np.abs(signed) > 1e-4)
    got = array.reshape(-1)
    assert (signed[decided] > 0).any() and (signed[decided] <= 0).any()  # the plane cuts the checked voxels
    assert np.array_equal(got[decided], signed[decided] > 0)
    assert not got[outside_crop].any()
    assert array[tuple(click_index[::-1])]  # the clicked voxel is in the mask


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_every_scalar_type_segments_from_a_file(dtype, cli_model, tmp_path, capsys):
    array = np.random.default_rng(0).integers(0, 100, (24, 26, 28)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.1, 0.9, 1.3))
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "mask.nii.gz"
    point = ",".join(f"{v:g}" for v in index_to_physical(image, (14, 13, 12)))
    assert main(["segment", str(path), f"--point={point}", "--model", str(cli_model), "--out", str(out)]) == 0, capsys.readouterr().err
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == image.GetSize() and sitk.GetArrayViewFromImage(mask)[12, 13, 14] == 1


def test_an_oblique_tiny_volume_through_the_command_line(cli_model, tmp_path, capsys):
    image = _volume(size=(5, 5, 5), spacing=(0.7, 0.7, 3.0))
    image.SetDirection(_rotation(5))
    image.SetOrigin((-3.0, 2.0, 40.0))
    path = tmp_path / "tiny.mha"
    sitk.WriteImage(image, str(path))
    out = tmp_path / "mask.nrrd"
    point = ",".join(f"{v:g}" for v in index_to_physical(image, (2, 2, 2)))
    assert main(["segment", str(path), f"--point={point}", "--model", str(cli_model), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == (5, 5, 5)
    assert np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert report["voxels"] == int(sitk.GetArrayViewFromImage(mask).sum()) >= 1
