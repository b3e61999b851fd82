"""Our modules reproduce the public FastSAM3D student and SAM-Med3D teacher.

``Testing/data/public_reference.json`` holds outputs of the public code (arcadelab/FastSAM3D and
uni-medical/SAM-Med3D, commits in its ``meta``) run on seeded weights from
``Testing/reference_weights.py``; here the same weights go through a checkpoint file in the public
layout and ``load_model``. A second set of tests pins the two unusual blocks against plain-tensor
re-statements written independently of the model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from FastSAM3DLib import build_model, load_model
from FastSAM3DLib.attention import use_backend
from FastSAM3DLib.modeling import Block
from reference_weights import reference_image, reference_state_dict

REFERENCE = json.loads((Path(__file__).resolve().parents[1] / "data" / "public_reference.json").read_text())
TOLERANCE = 1e-4


def _relative_error(ours: torch.Tensor, record: dict) -> float:
    assert list(ours.shape) == record["shape"]
    flat = ours.detach().double().flatten()
    sample = flat[:: record["stride"]][: len(record["sample"])]
    expected = torch.tensor(record["sample"], dtype=torch.float64)
    error = float((sample - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    # The sums cover every element, not just the sample.
    error = max(error, abs(float(flat.sum()) - record["sum"]) / max(record["abs_sum"], 1e-12))
    return error


def _outputs(model) -> dict:
    image = reference_image(seed=1)
    mask = 2.0 * reference_image(seed=2, size=32)
    coords = torch.tensor([[[64.0, 50.0, 70.0], [30.0, 90.0, 60.0]]])
    labels = torch.tensor([[1, 0]])
    out = {}
    with torch.no_grad():
        embedding, blocks = model.image_encoder.forward_with_intermediates(image)
        out["embedding"] = embedding
        out.update({f"block_{i}": t for i, t in enumerate(blocks)})
        out["dense_pe"] = model.prompt_encoder.get_dense_pe()
        for tag, mask_prompt in (("nomask", None), ("mask", mask)):
            sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
            out[f"sparse_{tag}"], out[f"dense_{tag}"] = sparse, dense
            for multi, prefix in ((False, ""), (True, "multi_")):
                logits, iou = model.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multi,
                )
                out[f"low_res_{prefix}{tag}"], out[f"iou_{prefix}{tag}"] = logits, iou
    return out


def _public_layout_checkpoint(name: str, path: Path) -> None:
    shapes = {key: tuple(shape) for key, shape in REFERENCE[name]["params"]["state_dict_shapes"].items()}
    torch.save({"model_state_dict": reference_state_dict(shapes, seed=0), "epoch": 7}, path)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_public_layout_checkpoint_reproduces_public_outputs(name, tmp_path):
    path = tmp_path / f"{name}.pth"
    _public_layout_checkpoint(name, path)
    model = load_model(path, device="cpu")
    path.unlink()
    expected_kinds = ["mlp", "mlp"] + ["fastsam3d"] * 4 if name == "student" else ["standard"] * 12
    assert model.config["block_kinds"] == expected_kinds
    outputs = _outputs(model)
    records = REFERENCE[name]["tensors"]
    compared = [key for key in outputs if key in records]
    assert {"embedding", "low_res_nomask", "low_res_mask", "iou_nomask", "iou_mask"} <= set(compared)
    errors = {key: _relative_error(outputs[key], records[key]) for key in compared}
    assert max(errors.values()) < TOLERANCE, errors


def test_sdpa_and_math_backends_agree_on_the_student():
    model = build_model("fastsam3d")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_state_dict(shapes, seed=0))
    image = reference_image(seed=1)
    with torch.no_grad():
        with use_backend("math"):
            reference = model.image_encoder(image)
        with use_backend("sdpa"):
            fused = model.image_encoder(image)
    assert float((fused - reference).abs().max() / reference.abs().max()) < TOLERANCE


# --- plain-tensor re-statements -----------------------------------------------------------------


def _restated_bias(q: torch.Tensor, td: torch.Tensor, th: torch.Tensor, tw: torch.Tensor, side: int) -> torch.Tensor:
    """bias[(i,j,l),(p,s,r)] = q(i,j,l).Td[i-r+S-1] + q(i,j,p).Th[j-r+S-1] + q(i,j,s).Tw[s-r+S-1].

    q: heads x side^3 x c. Written with explicit index grids, independently of the model code.
    """
    heads, _, c = q.shape
    grid = q.reshape(heads, side, side, side, c)
    i, j, l, p, s, r = torch.meshgrid(*[torch.arange(side)] * 6, indexing="ij")
    first = (grid[:, i, j, l] * td[i - r + side - 1]).sum(-1)
    second = (grid[:, i, j, p] * th[j - r + side - 1]).sum(-1)
    third = (grid[:, i, j, s] * tw[s - r + side - 1]).sum(-1)
    return (first + second + third).reshape(heads, side**3, side**3)


def _restated_attention(x: torch.Tensor, attn, side: int) -> torch.Tensor:
    """x: side^3 x C tokens -> side^3 x C, softmax(q k^T / sqrt(c) + bias) v then proj."""
    heads = attn.num_heads
    n, width = x.shape
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[:, m * width:(m + 1) * width].reshape(n, heads, -1).transpose(0, 1) for m in range(3))
    logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    logits = logits + _restated_bias(q, attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w, side)
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(0, 1).reshape(n, width) @ attn.proj.weight.T + attn.proj.bias


def _layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    hidden = x @ mlp.lin1.weight.T + mlp.lin1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return hidden @ mlp.lin2.weight.T + mlp.lin2.bias


def _randomised(block: Block) -> Block:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return block.eval()


def test_padded_window_teacher_block_matches_restatement():
    block = _randomised(Block(32, 2, kind="standard", window_size=14, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)))
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = block(x)[0].reshape(512, 32)
        tokens = x[0]
        normed = _layer_norm(tokens, block.norm1)
        padded = torch.zeros(14, 14, 14, 32)
        padded[:8, :8, :8] = normed  # zero tokens after the norm; they attend as keys and values
        attended = _restated_attention(padded.reshape(-1, 32), block.attn, 14).reshape(14, 14, 14, 32)[:8, :8, :8]
        residual = tokens + attended
        expected = (residual + _mlp(_layer_norm(residual, block.norm2), block.mlp)).reshape(512, 32)
    assert float((ours - expected).abs().max() / expected.abs().max()) < TOLERANCE


def test_fastsam3d_block_matches_restatement():
    block = _randomised(Block(32, 2, kind="fastsam3d", window_size=0, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)))
    x = torch.randn(1, 8, 8, 8, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = block(x)[0].reshape(512, 32)
        tokens = x[0].reshape(512, 32)
        residual = tokens + _restated_attention(_layer_norm(tokens, block.norm1), block.attn, 8)
        normed = _layer_norm(residual, block.norm2)  # the residual stream itself is normalised
        expected = normed + _mlp(normed, block.mlp)
    assert float((ours - expected).abs().max() / expected.abs().max()) < TOLERANCE
