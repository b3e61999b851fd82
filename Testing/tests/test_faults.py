"""Fault injection and concurrency: failures inside the model, cancelled embeddings, full disks, threads.

Each test injects one fault where it would really happen (the encoder's or decoder's forward, SimpleITK's
writer, ``os.replace``, the process's file-size limit) and checks the promise of issue 8: a clear error,
the user's existing files exactly as they were, no temporary files left, and a session that still works
and then gives the same answer as one that never saw the fault.

A cut-off download and its resume are tested against a real HTTP server in ``test_slicer_download.py``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import Session, build_model, save_model
from FastSAM3DLib.cli import main
from FastSAM3DLib.io import OutputError, write_image_atomic
from FastSAM3DLib.preprocess import index_to_physical
from FastSAM3DLib.session import EmbeddingCancelled

REPO = Path(__file__).resolve().parents[2]
# The exact path throughout: faults are injected by replacing a module's forward, which the fast
# paths then call as it is (in fp32), so the fault-free reference must use the same arithmetic.
PRECISION = "fp32"


def _tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def _image(size=(40, 44, 36), seed=0, spacing=(1.2, 1.0, 1.5)) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(100, 20, size[::-1]).astype(np.float32)
    array[10:25, 12:30, 8:28] += 80  # a bright block to segment
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 5.0, 30.0))
    return image


def _clicks(image: sitk.Image):
    return [
        (index_to_physical(image, (18, 20, 16)), True),
        (index_to_physical(image, (30, 10, 8)), False),
        (index_to_physical(image, (14, 26, 20)), True),
    ]


def _reference(image: sitk.Image, clicks, prefetch: bool = False, predict_after=()) -> np.ndarray:
    """The mask a fault-free session gives for these clicks.

    The crop choice depends on ``prefetch``, and the answer on when predictions were asked for (each
    decode feeds its logits to the next): ``predict_after`` lists the click counts after which the
    session predicted before the end.
    """
    session = Session(_tiny(), precision=PRECISION, prefetch=prefetch)
    session.set_image(image, wait=prefetch)
    for number, (point, positive) in enumerate(clicks, 1):
        session.add_point(point, positive)
        if number in predict_after:
            session.predict()
    mask = sitk.GetArrayFromImage(session.predict())
    session.close()
    return mask


class _FailOnce:
    """Replaces a module's forward: raises on the first ``fail`` calls, then behaves normally."""

    def __init__(self, module: torch.nn.Module, fail: int = 1) -> None:
        self.forward = module.forward
        self.remaining = fail
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.remaining > 0:
            self.remaining -= 1
            raise RuntimeError("injected fault: the accelerator fell over")
        return self.forward(*args, **kwargs)


# -- faults inside the model -----------------------------------------------------------------------


def test_encoder_fault_is_reported_and_the_retry_gives_the_right_mask(monkeypatch):
    image = _image()
    clicks = _clicks(image)
    expected = _reference(image, clicks)
    model = _tiny()
    fault = _FailOnce(model.image_encoder)
    monkeypatch.setattr(model.image_encoder, "forward", fault)
    session = Session(model, precision=PRECISION, prefetch=False)
    session.set_image(image)
    for point, positive in clicks:
        session.add_point(point, positive)
    with pytest.raises(RuntimeError, match="injected fault"):
        session.predict()
    assert session.encoder_calls == 0 and session.cached_bytes() == 0
    # The failed embedding is not remembered: the retry embeds again and gives the fault-free answer.
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), expected)
    assert session.encoder_calls == 1 and fault.calls == 2
    session.close()


def test_a_failed_background_embedding_is_retried_by_the_first_click(monkeypatch):
    image = _image()
    clicks = _clicks(image)[:1]
    expected = _reference(image, clicks, prefetch=True)  # the click is decoded in the prefetched centre crop
    model = _tiny()
    monkeypatch.setattr(model.image_encoder, "forward", _FailOnce(model.image_encoder))
    session = Session(model, precision=PRECISION, prefetch=True)
    with pytest.raises(RuntimeError, match="injected fault"):
        session.set_image(image, wait=True)  # the prefetch at the image centre failed
    session.add_point(*clicks[0])
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), expected)
    session.close()


def test_decoder_fault_keeps_the_previous_mask_and_undo_works(monkeypatch):
    image = _image()
    clicks = _clicks(image)
    expected_first = _reference(image, clicks[:1])
    expected_all = _reference(image, clicks, predict_after=(1,))
    model = _tiny()
    session = Session(model, precision=PRECISION, prefetch=False)
    session.set_image(image)
    session.add_point(*clicks[0])
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), expected_first)
    fault = _FailOnce(model.mask_decoder)
    monkeypatch.setattr(model.mask_decoder, "forward", fault)
    session.add_point(*clicks[1])
    with pytest.raises(RuntimeError, match="injected fault"):
        session.predict()
    # Undo after the failure restores the last good mask exactly; redoing the clicks gives the right answer.
    assert session.undo()
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), expected_first)
    for point, positive in clicks[1:]:
        session.add_point(point, positive)
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), expected_all)
    assert session.encoder_calls == 1  # the fault did not cost a re-embedding
    session.close()


def test_decoder_fault_during_uncertainty_leaves_dropout_off(monkeypatch):
    image = _image()
    model = _tiny()
    session = Session(model, precision=PRECISION, prefetch=False)
    session.set_image(image)
    session.add_point(*_clicks(image)[0])
    before = sitk.GetArrayFromImage(session.predict())
    monkeypatch.setattr(model.mask_decoder, "forward", _FailOnce(model.mask_decoder))
    with pytest.raises(RuntimeError, match="injected fault"):
        session.uncertainty(n=4)
    dropouts = [m for m in model.mask_decoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    assert all(m.p == pytest.approx(model.config["decoder_dropout"]) for m in dropouts)
    session.add_point(*_clicks(image)[1])
    assert session.undo()
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), before)
    mean, spread = session.uncertainty(n=4)  # and uncertainty works again
    assert mean.GetSize() == image.GetSize()
    session.close()


# -- cancellation and switching volumes ------------------------------------------------------------


class _Gate:
    """A forward pre-hook on an encoder block that holds the embedding there until released."""

    def __init__(self, model: torch.nn.Module, block: int = 1) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.handle = model.image_encoder.blocks[block].register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.entered.set()
        assert self.release.wait(30), "the test never released the embedding"

    def remove(self) -> None:
        self.release.set()
        self.handle.remove()


def test_switching_volumes_mid_embedding_cancels_and_nothing_of_the_old_image_leaks():
    # Same geometry, different content: the two images' crops are the same CropGrid keys, so a leaked
    # embedding of the old image would be used for the new one and change the mask.
    old, new = _image(seed=1), _image(seed=2)
    new_array = sitk.GetArrayFromImage(new)
    new_array[5:15] = 300.0  # clearly different content
    new = sitk.GetImageFromArray(new_array)
    new.CopyInformation(old)
    clicks = _clicks(new)
    expected = _reference(new, clicks, prefetch=True)

    model = _tiny()
    gate = _Gate(model)
    session = Session(model, precision=PRECISION, prefetch=True)
    try:
        session.set_image(old)  # prefetch starts and is held inside block 1
        assert gate.entered.wait(30)
        old_future = next(iter(session._pending.values()))
        session.set_image(new)
        for point, positive in clicks:
            session.add_point(point, positive)
        gate.remove()
        with pytest.raises(EmbeddingCancelled):
            old_future.result(timeout=30)
        mask = sitk.GetArrayFromImage(session.predict())
    finally:
        gate.remove()
    assert np.array_equal(mask, expected)
    # Only embeddings of the new image were counted and cached.
    assert session.encoder_calls == len(session._embeddings) >= 1
    session.close()


def test_closing_a_session_mid_embedding_cancels_it():
    model = _tiny()
    gate = _Gate(model)
    session = Session(model, precision=PRECISION, prefetch=True)
    try:
        session.set_image(_image())
        assert gate.entered.wait(30)
        future = next(iter(session._pending.values()))
        closer = threading.Thread(target=session.close)
        closer.start()
        gate.remove()
        closer.join(30)
        assert not closer.is_alive()
        with pytest.raises(EmbeddingCancelled):
            future.result(timeout=30)
    finally:
        gate.remove()
    assert session.encoder_calls == 0 and session.cached_bytes() == 0


# -- concurrency -----------------------------------------------------------------------------------


def test_two_sessions_in_threads_sharing_one_model_match_sequential_runs():
    model = _tiny()
    images = [_image(seed=3), _image(seed=4, size=(36, 40, 44), spacing=(0.9, 1.1, 1.0))]
    plans = [_clicks(image) for image in images]

    def run(image, clicks, out, index, barrier=None):
        session = Session(model, precision=PRECISION, prefetch=True)
        if barrier is not None:
            barrier.wait(30)
        session.set_image(image)
        masks = []
        for point, positive in clicks:
            session.add_point(point, positive)
            masks.append(sitk.GetArrayFromImage(session.predict()))
        probability = sitk.GetArrayFromImage(session.predict_proba())
        out[index] = (masks, probability)
        session.close()

    sequential = [None, None]
    for i in range(2):
        run(images[i], plans[i], sequential, i)
    for _ in range(3):
        parallel = [None, None]
        barrier = threading.Barrier(2)
        errors = []

        def target(i):
            try:
                run(images[i], plans[i], parallel, i, barrier)
            except BaseException as error:  # reported below, with the thread's failure
                errors.append(error)

        threads = [threading.Thread(target=target, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        for i in range(2):
            for got, want in zip(parallel[i][0], sequential[i][0]):
                assert np.array_equal(got, want)
            np.testing.assert_allclose(parallel[i][1], sequential[i][1], rtol=0, atol=1e-6)


# -- full disk and failed writes in the command line -----------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_model(build_model("tiny"), folder / "tiny.safetensors")
    sitk.WriteImage(_image(), str(folder / "image.nrrd"))
    return folder


def _segment_args(files: Path, out: Path, *extra: str):
    point = ",".join(f"{v:g}" for v in index_to_physical(_image(), (18, 20, 16)))
    return ["segment", str(files / "image.nrrd"), f"--point={point}", "--model", str(files / "tiny.safetensors"),
            "--out", str(out), *extra]


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where", ["WriteImage", "os.replace"])
def test_full_disk_on_write_leaves_the_existing_output_untouched(where, cli_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"yesterday's careful segmentation")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "WriteImage":
        monkeypatch.setattr(sitk, "WriteImage", full)
    else:
        monkeypatch.setattr(os, "replace", full)
    status = main(_segment_args(cli_files, out))
    err = capsys.readouterr().err
    assert status == 1
    assert "No space left on device" in err and "internal error" not in err
    assert out.read_bytes() == b"yesterday's careful segmentation"
    assert _leftovers(tmp_path) == []


def test_a_failed_second_rename_restores_the_first_output(cli_files, tmp_path, monkeypatch, capsys):
    out, spread = tmp_path / "mask.nii.gz", tmp_path / "uncertainty.nii.gz"
    out.write_bytes(b"old mask")
    spread.write_bytes(b"old uncertainty")
    real_replace = os.replace
    calls = []

    def replace(source, destination):
        calls.append(Path(destination).name)
        if Path(destination) == spread and Path(source).parent != tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    status = main(_segment_args(cli_files, out, "--uncertainty", str(spread), "--uncertainty-n", "2"))
    assert status == 1, capsys.readouterr().err
    assert calls[0] == "mask.nii.gz"  # the mask had already been moved into place ...
    assert out.read_bytes() == b"old mask"  # ... and was put back
    assert spread.read_bytes() == b"old uncertainty"
    assert _leftovers(tmp_path) == []


def test_interrupt_while_writing_leaves_nothing(cli_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"keep me")
    real_write = sitk.WriteImage

    def write_then_interrupt(image, path, *args):
        real_write(image, path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", write_then_interrupt)
    assert main(_segment_args(cli_files, out)) == 130
    assert out.read_bytes() == b"keep me"
    assert _leftovers(tmp_path) == []


_FULL_DISK_CHILD = r"""
import json, resource, signal, sys
sys.path.insert(0, {repo!r})
from FastSAM3DLib.cli import main
import FastSAM3DLib.io, FastSAM3DLib.session, FastSAM3DLib.checkpoint, FastSAM3DLib.visualize  # import before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
for argv in {runs!r}:
    status = main(argv)
    print("@@" + json.dumps(status), file=sys.stderr, flush=True)
"""

FULL_DISK_SUFFIXES = [".nii.gz", ".nii", ".nrrd", ".mha"]


def test_real_write_failure_from_a_file_size_limit(cli_files, tmp_path):
    """The OS refuses the write part-way (RLIMIT_FSIZE, like a disk filling up), in a child process.

    SimpleITK's NIfTI writer reports this only on stderr and leaves a truncated file: without our
    check the truncated mask would replace the existing one and the command would report success.
    """
    outs = [tmp_path / f"mask{suffix}" for suffix in FULL_DISK_SUFFIXES]
    for out in outs:
        out.write_bytes(b"precious")
    runs = [_segment_args(cli_files, out) for out in outs]
    code = _FULL_DISK_CHILD.format(repo=str(REPO), limit=1024, runs=runs)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    reports = child.stderr.split("@@")
    assert len(reports) == len(outs) + 1, child.stderr
    for out, report, after in zip(outs, reports[:-1], reports[1:]):
        assert after.startswith("1"), (out.name, report)  # exit status 1: a fault, not bad input
        assert f"{out}: could not be written" in report, report
        assert "Traceback" not in report
        assert out.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == []


def test_write_image_atomic_refuses_a_truncated_write(tmp_path, monkeypatch):
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(b"old")
    real_write = sitk.WriteImage

    def truncating(image, name, *args):  # what the NIfTI writer does when the disk fills: no error
        real_write(image, name, *args)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", truncating)
    with pytest.raises(OutputError, match="incomplete, is the disk full"):
        write_image_atomic(_image(), path)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix, data_suffix", [(".mhd", ".zraw"), (".nhdr", ".raw.gz")])
def test_detached_header_outputs_name_their_data_file_and_leave_no_temporaries(suffix, data_suffix, cli_files, tmp_path):
    out = tmp_path / f"mask{suffix}"
    for _ in range(2):  # the second run replaces the first run's files
        assert main(_segment_args(cli_files, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, f"mask{data_suffix}"])
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == _image().GetSize()
    mode = out.stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the 0600 of a temporary file
