"""Shapes, parameter counts and input validation of the model modules."""

from __future__ import annotations

import pytest
import torch

from FastSAM3DLib import build_model, count_parameters
from FastSAM3DLib.modeling import Block, ImageEncoderViT3D


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
