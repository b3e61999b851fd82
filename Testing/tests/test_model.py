"""Shapes, parameter counts and input validation of the model modules."""

from __future__ import annotations

import pytest
import torch

from FastSAM3DLib import build_model, count_parameters
from FastSAM3DLib.modeling import Block, ImageEncoderViT3D
from FastSAM3DLib.widen import widen_model


def test_parameter_counts_match_the_public_models():
    student = build_model("fastsam3d")
    teacher = build_model("sam-med3d")
    # DESIGN.md §2: 53.2 M (student) and 100.5 M (teacher), encoder 45.6 M; ± 0.1 M.
    assert abs(count_parameters(student) - 53.2e6) < 0.1e6
    assert abs(count_parameters(student.image_encoder) - 45.6e6) < 0.1e6
    assert abs(count_parameters(teacher) - 100.5e6) < 0.1e6


def test_block_layout_of_student_and_teacher():
    student = build_model("fastsam3d").image_encoder
    assert [b.kind for b in student.blocks] == ["mlp", "mlp"] + ["fastsam3d"] * 4
    assert all(b.window_size == 0 for b in student.blocks)
    assert not hasattr(student.blocks[0], "attn")
    assert tuple(student.blocks[2].attn.rel_pos_d.shape) == (15, 128)
    teacher = build_model("sam-med3d").image_encoder
    windows = [b.window_size for b in teacher.blocks]
    assert windows == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    assert tuple(teacher.blocks[0].attn.rel_pos_d.shape) == (27, 64)
    assert tuple(teacher.blocks[2].attn.rel_pos_d.shape) == (15, 64)


def test_module_shapes(tiny_model):
    model = tiny_model
    with torch.no_grad():
        image = torch.randn(2, 1, 128, 128, 128)
        embedding = model.image_encoder(image)
        assert embedding.shape == (2, 48, 8, 8, 8)
        dense_pe = model.prompt_encoder.get_dense_pe()
        assert dense_pe.shape == (1, 48, 8, 8, 8)
        coords = torch.tensor([[[64.0, 50.0, 70.0]], [[10.0, 20.0, 30.0]]])
        labels = torch.tensor([[1], [0]])
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        assert sparse.shape == (2, 2, 48)  # the click plus the padding point
        assert dense.shape == (2, 48, 8, 8, 8)
        sparse_m, dense_m = model.prompt_encoder(points=(coords, labels), masks=torch.zeros(2, 1, 32, 32, 32))
        assert dense_m.shape == (2, 48, 8, 8, 8)
        logits, iou = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        assert logits.shape == (2, 1, 32, 32, 32) and iou.shape == (2, 1)
        logits3, iou3 = model.mask_decoder(
            image_embeddings=embedding, image_pe=dense_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=True,
        )
        assert logits3.shape == (2, 3, 32, 32, 32) and iou3.shape == (2, 3)
        # One image embedding is shared by a batch of prompts.
        batch_logits, _ = model.decode(embedding[:1], coords, labels)
        assert batch_logits.shape == (2, 1, 32, 32, 32)
        _, intermediates = model.image_encoder.forward_with_intermediates(image[:1])
        assert [t.shape for t in intermediates] == [torch.Size([1, 8, 8, 8, 48])] * 3


@pytest.mark.parametrize(
    "shape",
    [(1, 128, 128, 128), (1, 1, 64, 64, 64), (1, 2, 128, 128, 128), (1, 1, 128, 128, 120)],
)
def test_encoder_rejects_wrong_input_shapes(tiny_model, shape):
    with pytest.raises(ValueError, match=r"image encoder input must have shape \(B, 1, 128, 128, 128\)"):
        tiny_model.image_encoder(torch.zeros(shape))


def test_prompt_encoder_rejects_wrong_shapes(tiny_model):
    encoder = tiny_model.prompt_encoder
    with pytest.raises(ValueError, match="points must be coords"):
        encoder(points=(torch.zeros(1, 2), torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="mask prompt must have shape"):
        encoder(points=(torch.zeros(1, 1, 3), torch.ones(1, 1)), masks=torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="no box embedding"):
        encoder(points=None, boxes=torch.zeros(1, 6))


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_h'"):
        build_model("vit_h")
    with pytest.raises(ValueError, match="unknown model configuration fields: depth"):
        build_model({"depth": 3})
    with pytest.raises(ValueError, match="unknown block kind"):
        Block(48, 2, kind="linear")


def test_padding_tokens_take_part_in_window_attention():
    """A window block over an 8^3 grid pads to 14^3 and the padded keys change the result."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT3D(embed_dim=48, num_heads=2, block_kinds=["standard"], window_size=14, out_chans=48)
    block = encoder.blocks[0]
    with torch.no_grad():
        block.attn.qkv.bias.normal_()
        x = torch.randn(1, 8, 8, 8, 48)
        padded = block(x)
        block.window_size = 0  # same weights, attention over the 512 real tokens only
        block.attn.rel_pos_d.data = torch.zeros(15, 24)
        block.attn.rel_pos_h.data = torch.zeros(15, 24)
        block.attn.rel_pos_w.data = torch.zeros(15, 24)
        unpadded = block(x)
    assert padded.shape == unpadded.shape == x.shape
    assert not torch.allclose(padded, unpadded, atol=1e-3)


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_model_computes_what_the_narrow_one_does(factor):
    """Widening (the benchmark's full-size student with a trained model's masks) keeps the function:
    the encoder output and the decoded logits match the source. Every weight is perturbed first, so that
    the relative-position tables (zero at initialisation) take part."""
    torch.manual_seed(0)
    narrow = build_model("tiny")
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wide = widen_model(narrow, factor)
    assert wide.config["embed_dim"] == factor * narrow.config["embed_dim"] and wide.config["num_heads"] == narrow.config["num_heads"]
    assert wide.config["widened_from"] == "tiny" and wide.config["name"] == f"tiny widened x{factor}"
    x = torch.randn(1, 1, 128, 128, 128)
    coords, labels = torch.tensor([[[40.0, 70.0, 64.0], [80.0, 60.0, 50.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        embedding, wide_embedding = narrow.image_encoder(x), wide.image_encoder(x)
        assert torch.allclose(wide_embedding, embedding, atol=1e-4)
        logits, iou = narrow.decode(embedding, coords, labels)
        wide_logits, wide_iou = wide.decode(wide_embedding, coords, labels)
    assert torch.allclose(wide_logits, logits, atol=1e-3) and torch.allclose(wide_iou, iou, atol=1e-4)
    # A broken copy rule is visible: without the q scaling the attention sharpens and the output moves.
    state = wide.state_dict()
    state["image_encoder.blocks.1.attn.qkv.weight"] *= factor**0.5
    wide.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(wide.image_encoder(x), embedding, atol=1e-2)


def test_widening_the_bundled_architecture_gives_the_full_size_student():
    wide = widen_model(build_model("fastsam3d-384"), 2)
    shapes = {k: v.shape for k, v in build_model("fastsam3d").state_dict().items()}
    assert {k: v.shape for k, v in wide.state_dict().items()} == shapes
    assert count_parameters(wide) == count_parameters(build_model("fastsam3d"))
    with pytest.raises(ValueError, match="windowed teachers"):
        widen_model(build_model("tiny-teacher"), 2)
    with pytest.raises(ValueError, match="whole number"):
        widen_model(build_model("tiny"), 1.5)
