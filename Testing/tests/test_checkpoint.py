"""Checkpoint layouts, architecture inference, error messages, and safe loading."""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from FastSAM3DLib import CheckpointError, build_model, convert_checkpoint, infer_config, load_model, save_model
from FastSAM3DLib.build import CONFIGS, model_config
from FastSAM3DLib.checkpoint import load_image_encoder, read_model_card, sha256_file


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_architecture_is_inferred_from_keys_and_shapes(name):
    model = build_model(name)
    inferred = infer_config(model.state_dict())
    expected = model_config(name)
    # decoder dropout and heads cannot be seen in the weights; everything else must be.
    for key in expected:
        if key in ("name", "decoder_dropout", "decoder_heads"):
            continue
        assert inferred[key] == expected[key], key


@pytest.mark.parametrize(
    "layout",
    ["model_state_dict", "bare", "training", "ddp_prefix", "safetensors"],
)
def test_round_trip_of_each_layout(layout, tmp_path, tiny_model):
    state = tiny_model.state_dict()
    path = tmp_path / "ckpt.pth"
    if layout == "model_state_dict":
        torch.save({"model_state_dict": state}, path)
    elif layout == "bare":
        torch.save(state, path)
    elif layout == "training":
        optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-4)
        loss = sum(p.sum() for p in tiny_model.parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = tiny_model.state_dict()
        torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3, "lr": 1e-4}, path)
    elif layout == "ddp_prefix":
        torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        digest = save_model(tiny_model, path)
        assert (tmp_path / "ckpt.safetensors.sha256").read_text().split()[0] == digest == sha256_file(path)
    loaded = load_model(path, device="cpu")
    assert _same_weights(loaded, tiny_model)
    assert loaded.config["sha256"] == sha256_file(path)
    if layout == "safetensors":
        assert loaded.config["decoder_dropout"] == model_config("tiny")["decoder_dropout"]


def test_encoder_only_student_checkpoint(tmp_path, tiny_model):
    encoder_path = tmp_path / "encoder.pth"
    torch.save({"model_state_dict": tiny_model.image_encoder.state_dict()}, encoder_path)
    full_path = tmp_path / "full.pth"
    torch.save({"model_state_dict": tiny_model.state_dict()}, full_path)
    with pytest.raises(CheckpointError, match="holds only an image encoder.*decoder_path"):
        load_model(encoder_path, device="cpu")
    loaded = load_model(encoder_path, device="cpu", decoder_path=full_path)
    assert _same_weights(loaded, tiny_model)
    encoder = load_image_encoder(encoder_path, device="cpu")
    assert _same_weights(encoder, tiny_model.image_encoder)
    assert not loaded.config["first_click_multimask"]
    # A decoder trained with candidate masks for a first click keeps answering that way.
    with_candidates = build_model("tiny")
    with_candidates.load_state_dict(tiny_model.state_dict())
    with_candidates.config["first_click_multimask"] = True
    save_model(with_candidates, tmp_path / "candidates.safetensors")
    assert load_model(encoder_path, device="cpu", decoder_path=tmp_path / "candidates.safetensors").config["first_click_multimask"]



def test_training_checkpoint_keeps_its_architecture_settings(tmp_path, tiny_model):
    """A checkpoint of `fastsam3d train` records settings the weights cannot show (first-click candidates, dropout)."""
    config = {k: v for k, v in tiny_model.config.items() if k not in ("source", "sha256")}
    config.update(first_click_multimask=True, decoder_dropout=0.25)
    path = tmp_path / "last.pt"
    torch.save({"model": tiny_model.state_dict(), "step": 7, "model_config": json.dumps(config)}, path)
    loaded = load_model(path, device="cpu")
    assert loaded.config["first_click_multimask"] and loaded.config["decoder_dropout"] == 0.25
    assert _same_weights(loaded, tiny_model)


def test_missing_unexpected_and_wrong_shape_keys_are_listed(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(3)
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(4, 47)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path, device="cpu")
    message = str(error.value)
    assert str(path) in message
    assert "missing keys (1):\n    mask_decoder.iou_token.weight" in message
    assert "unexpected keys (1):\n    mask_decoder.extra.weight" in message
    assert "mask_decoder.mask_tokens.weight: file (4, 47), model (4, 48)" in message


def test_skip_layer_mismatch_gets_a_hint(tmp_path, tiny_model):
    path = tmp_path / "student.pth"
    torch.save(tiny_model.state_dict(), path)
    # Forcing attention into block 0 (public code built with skip_layer=0) cannot match these weights.
    kinds = ["fastsam3d", "fastsam3d", "fastsam3d"]
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*blocks\.0\.attn.*hint: the public FastSAM3D student has no attention in blocks 0 and 1"):
        load_model(path, device="cpu", config={"block_kinds": kinds})


def test_not_a_fastsam3d_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="missing key 'image_encoder.pos_embed'"):
        load_model(path, device="cpu")


class _RunsCode:
    """Unpickling this calls os.system — what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, tiny_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"model_state_dict": tiny_model.state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused.*fastsam3d convert-checkpoint IN OUT --trust"):
        load_model(path, device="cpu")
    assert not marker.exists()
    # A bare pickle (not torch's zip format) too.
    bare = tmp_path / "hostile.pkl"
    bare.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_model(bare, device="cpu")
    assert not marker.exists()


def test_training_checkpoint_with_args_needs_trusted_conversion(tmp_path, tiny_model):
    path = tmp_path / "train.pth"
    torch.save({"model_state_dict": tiny_model.state_dict(), "args": argparse.Namespace(lr=8e-4)}, path)
    with pytest.raises(CheckpointError, match=r"refused.*argparse.Namespace.*convert-checkpoint"):
        load_model(path, device="cpu")
    out = tmp_path / "converted.safetensors"
    with pytest.raises(CheckpointError, match="refused"):
        convert_checkpoint(path, out)
    assert not out.exists()
    digest = convert_checkpoint(path, out, trust=True)
    assert digest == sha256_file(out)
    assert _same_weights(load_model(out, device="cpu"), tiny_model)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "missing", "folder"])
def test_broken_files_give_specific_errors(damage, tmp_path, tiny_model):
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": tiny_model.state_dict()}, path)
    data = path.read_bytes()
    expected = {
        "truncated": "truncated/corrupt",
        "random": "not a PyTorch checkpoint",
        "empty": "the file is empty",
        "missing": "no such checkpoint file",
        "folder": "is a folder",
    }[damage]
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(CheckpointError, match=expected):
        load_model(path, device="cpu")


def test_truncated_safetensors(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path)
    (tmp_path / "model.safetensors.sha256").unlink()
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path, device="cpu")


def test_checksum_mismatch_is_refused(tmp_path, tiny_model):
    path = tmp_path / "model.safetensors"
    save_model(tiny_model, path)
    (tmp_path / "model.safetensors.sha256").write_text("0" * 64 + "  model.safetensors\n")
    with pytest.raises(CheckpointError, match="sha256 is .* expected 0000"):
        load_model(path, device="cpu")


def test_no_bundled_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSAM3D_BUNDLED_MODEL", str(tmp_path / "absent.safetensors"))
    with pytest.raises(CheckpointError, match=r"no bundled model weights.*--model PATH"):
        load_model(None, device="cpu")


def test_bundled_weights_are_verified(monkeypatch, tmp_path, tiny_model):
    path = tmp_path / "bundled.safetensors"
    save_model(tiny_model, path)
    monkeypatch.setenv("FASTSAM3D_BUNDLED_MODEL", str(path))
    assert _same_weights(load_model(None, device="cpu"), tiny_model)
    with open(path, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="sha256 is"):
        load_model(None, device="cpu")


def test_random_bytes_always_give_a_checkpoint_error(tmp_path):
    """300 seeded random files: each is refused with CheckpointError, never another exception
    (about 6 % of them used to escape the weights-only unpickler as a bare IndexError)."""
    path = tmp_path / "model.pth"
    for seed in range(300):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
            load_model(path, device="cpu")


def test_model_card_is_read_from_the_header_and_checked(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "card.safetensors", {"model_card": {"steps": 3}})
    assert read_model_card(tmp_path / "card.safetensors") == {"steps": 3}
    save_model(tiny_model, tmp_path / "plain.safetensors")
    assert read_model_card(tmp_path / "plain.safetensors") == {}
    save_model(tiny_model, tmp_path / "bad.safetensors", {"model_card": "{not json"})
    with pytest.raises(CheckpointError, match="bad.safetensors: metadata field 'model_card' is not JSON"):
        read_model_card(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "card.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        read_model_card(tmp_path / "cut.safetensors")
