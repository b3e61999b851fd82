"""Speed modes against the exact path: fast decoder and encoder, int8, sparse attention, paste-back.

Every fast path must compute what the fp32 path computes: exactly (to float rounding) where it
only reorders the arithmetic, within a stated tolerance where it changes the arithmetic (int8,
sparse attention). Models are the tiny test configuration with fixed random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import Session, build_model
from FastSAM3DLib.attention import attention, decomposed_rel_pos_bias
from FastSAM3DLib.modeling import MaskDecoder3D, PromptEncoder3D, Sam3D
from FastSAM3DLib.paste import BoundaryRefinement, CropPaster
from FastSAM3DLib.preprocess import CropGrid, image_affine, index_to_physical, sample_crop_logits
from FastSAM3DLib.quantize import (
    FAST_MODES,
    Bf16Linear,
    FastDecoder,
    FastImageEncoder,
    Int8Linear,
    fast_path,
    int8_available,
    resolve_precision,
)
from FastSAM3DLib.sparse_attention import (
    group_indices,
    head_patterns,
    masked_dense_attention,
    pattern_mask,
    sparse_attention,
)

needs_int8 = pytest.mark.skipif(not int8_available(), reason="int8 kernels (fbgemm) need an x86 CPU")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():  # weights of a trained model's scale, so every path carries signal
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def _prompts(batch: int = 1):
    coords = torch.tensor([[[60.0, 64.0, 70.0], [50.0, 61.0, 64.0], [75.0, 70.0, 66.0]]]).repeat(batch, 1, 1)
    labels = torch.tensor([[1, 0, 1]]).repeat(batch, 1)
    return coords, labels


# -- sparse attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [("local", 2), ("local", 4), ("dilated", 2), ("dilated", 4)])
def test_sparse_groups_partition_the_grid(pattern):
    groups = group_indices((8, 8, 8), pattern)
    assert sorted(groups.reshape(-1).tolist()) == list(range(512))
    grid = np.stack(np.unravel_index(groups.numpy(), (8, 8, 8)), -1)  # G x S x 3
    kind, size = pattern
    if kind == "local":  # each group is one contiguous size^3 block
        assert (grid.max(1) - grid.min(1) == size - 1).all()
    else:  # each group shares its coordinates modulo the rate
        assert (grid % size == (grid[:, :1] % size)).all()


def _qkv_tables(heads=4, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, 512, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    tables = [torch.randn(15, dim, generator=generator, dtype=torch.float64) for _ in range(3)]
    return q, k, v, tables


def test_sparse_attention_covering_everything_is_dense_attention():
    q, k, v, tables = _qkv_tables()
    bias = decomposed_rel_pos_bias(q, *tables, (8, 8, 8), (8, 8, 8))
    dense = attention(q, k, v, bias, backend="math")
    for pattern in (("local", 8), ("dilated", 1)):
        out = sparse_attention(q, k, v, (8, 8, 8), [pattern] * 4, tables)
        torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_sparse_attention_equals_its_plain_restatement():
    q, k, v, tables = _qkv_tables(heads=6)
    patterns = head_patterns(6)
    assert patterns == [("local", 4)] * 3 + [("dilated", 2)] * 3
    bias = decomposed_rel_pos_bias(q, *tables, (8, 8, 8), (8, 8, 8))
    out = sparse_attention(q, k, v, (8, 8, 8), patterns, tables)
    torch.testing.assert_close(out, masked_dense_attention(q, k, v, (8, 8, 8), patterns, bias), rtol=1e-10, atol=1e-10)
    # and it is not dense attention: each query sees 64 of the 512 keys
    assert pattern_mask((8, 8, 8), patterns).sum(-1).unique().tolist() == [64]
    assert (out - attention(q, k, v, bias, backend="math")).abs().max() > 1e-3


# -- int8 and the restated encoder / decoder --------------------------------------------------------


@needs_int8
def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(1)
    layer = torch.nn.Linear(256, 96)
    x = torch.randn(37, 256)
    error = (Int8Linear.from_linear(layer)(x) - layer(x)).norm() / layer(x).norm()
    assert error < 0.02


def _assert_fast_decoder_matches(model, embedding: torch.Tensor, batches=(1, 3)) -> None:
    """FastDecoder against ``model.decode``: each batch, mask prompt (none, per prompt, one broadcast to
    the prompts, one prompt set broadcast to several masks) and output mode."""
    decoder = FastDecoder(model)
    grid = tuple(4 * s for s in embedding.shape[2:])
    for batch in batches:
        coords = torch.rand(batch, 3, 3) * (torch.tensor(grid, dtype=torch.float32) * 4 - 1)
        labels = torch.tensor([[1, 0, 1]]).repeat(batch, 1)
        masks = [None, torch.randn(batch, 1, *grid), torch.randn(1, 1, *grid)] + ([torch.randn(2, 1, *grid)] if batch == 1 else [])
        for mask in masks:
            for multimask in (False, True):
                with torch.inference_mode():
                    expected, expected_iou = model.decode(embedding, coords, labels, mask, multimask)
                    logits, iou = decoder(embedding, coords, labels, mask, multimask)
                assert logits.shape == (max(batch, 1 if mask is None else mask.shape[0]), 3 if multimask else 1, *grid)
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(iou, expected_iou, rtol=1e-4, atol=1e-5)


def test_fast_decoder_equals_the_model_decoder(tiny):
    torch.manual_seed(1)
    _assert_fast_decoder_matches(tiny, torch.randn(1, 48, 8, 8, 8))


def test_fast_decoder_equals_the_model_decoder_on_a_non_cubic_grid(tiny):
    """The fast decoder's block gathers and reorderings follow the grid: a 2 x 4 x 6 embedding (8 x 16 x 24 masks)."""
    torch.manual_seed(2)
    model = Sam3D(tiny.image_encoder, PromptEncoder3D(48, (2, 4, 6), (32, 64, 96)),
                  MaskDecoder3D(transformer_dim=48, transformer_heads=4, transformer_mlp_dim=64, iou_head_hidden_dim=32)).eval()
    _assert_fast_decoder_matches(model, torch.randn(1, 48, 2, 4, 6))


def test_fast_fp32_encoder_equals_the_model_encoder(tiny):
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(FastImageEncoder(tiny.image_encoder, "fp32")(x), tiny.image_encoder(x), rtol=1e-4, atol=1e-4)


def test_restated_patch_embedding_and_neck_are_exact(tiny):
    """The int8 encoder's matrix-multiply forms of the patch embedding and the 3^3 neck, run in fp32."""
    from FastSAM3DLib.quantize import _LinearNeck, _LinearPatchEmbed

    encoder = tiny.image_encoder
    x = torch.randn(1, 1, 128, 128, 128)
    tokens = torch.randn(1, 8, 8, 8, 48)
    with torch.inference_mode():
        torch.testing.assert_close(_LinearPatchEmbed(encoder.patch_embed, False)(x), encoder.patch_embed(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_LinearNeck(encoder.neck, False)(tokens), encoder.neck(tokens.permute(0, 4, 1, 2, 3)), rtol=1e-4, atol=1e-4)


@needs_int8
def test_int8_encoder_and_decoder_stay_close(tiny):
    # Seeded: the decoder's relative error is 0.04-0.09 over input seeds 0-11, and above 0.1 for a few.
    torch.manual_seed(0)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        reference = tiny.image_encoder(x)
        int8 = FastImageEncoder(tiny.image_encoder, "int8")(x)
        assert (int8 - reference).norm() / reference.norm() < 0.1
        coords, labels = _prompts()
        mask = torch.randn(1, 1, 32, 32, 32)
        expected, _ = tiny.decode(reference, coords, labels, mask)
        logits, _ = FastDecoder(tiny, int8=True)(reference, coords, labels, mask)
    assert (logits - expected).norm() / expected.norm() < 0.1


def test_fast_path_is_cached_and_rebuilt_when_weights_change():
    torch.manual_seed(0)
    model = build_model("tiny")
    path = fast_path(model, "fp32-fast")
    assert fast_path(model, "fp32-fast") is path
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    rebuilt = fast_path(model, "fp32-fast")
    assert rebuilt is not path
    coords, labels = _prompts()
    embedding = torch.randn(1, 48, 8, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.decode(embedding, coords, labels)[0], model.decode(embedding, coords, labels)[0], rtol=1e-4, atol=1e-5)


def test_a_replaced_decoder_is_respected():
    torch.manual_seed(0)
    model = build_model("tiny")
    path = fast_path(model, "fp32-fast")
    calls = []
    original = model.mask_decoder.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.mask_decoder.forward = forward
    coords, labels = _prompts()
    with torch.inference_mode():
        path.decode(torch.randn(1, 48, 8, 8, 8), coords, labels)
    assert calls


def test_auto_picks_a_measured_mode():
    from FastSAM3DLib import quantize

    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    chosen = resolve_precision("auto", torch.device("cpu"))
    cost = quantize.MEASURED_DICE5_COST.get(chosen)
    assert chosen == "fp32" or (cost is not None and cost <= quantize.AUTO_MAX_DICE_COST)
    assert "sparse" not in chosen  # opt-in only


# -- each mode through the session ------------------------------------------------------------------


def _volume():
    zz, yy, xx = np.mgrid[:48, :56, :40]
    array = 100.0 + 80.0 * (((xx - 20) ** 2 + (yy - 28) ** 2 + (zz - 24) ** 2) < 12**2)
    array += np.random.default_rng(0).normal(0, 5, array.shape)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.5, 1.2, 1.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    return image


# IoU against the fp32 mask each mode must reach on this fixed input (random-weight tiny model).
MODE_IOU = {"fp32-fast": 0.999, "int8": 0.97, "bf16": 0.97, "sparse": 0.95, "int8-sparse": 0.95}


@pytest.mark.parametrize("mode", FAST_MODES)
def test_each_mode_gives_masks_close_to_fp32(tiny, mode):
    if mode.startswith("int8") and not int8_available():
        pytest.skip("no int8 kernels here")
    image = _volume()
    clicks = [((20, 28, 24), True), ((4, 6, 5), False), ((26, 30, 20), True)]
    masks = {}
    for precision in ("fp32", mode):
        session = Session(tiny, precision=precision, prefetch=False)
        session.set_image(image)
        for index, positive in clicks:
            session.add_point(index_to_physical(image, index), positive)
            masks.setdefault(precision, []).append(sitk.GetArrayFromImage(session.predict()).astype(bool))
        assert session.precision == precision
        session.close()
    for reference, fast in zip(masks["fp32"], masks[mode]):
        union = (reference | fast).sum()
        iou = (reference & fast).sum() / union if union else 1.0
        assert iou >= MODE_IOU[mode], (mode, iou)


# -- paste-back -------------------------------------------------------------------------------------


AXIS_ALIGNED = {
    "lps_1mm": dict(spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)),
    "ras_flip": dict(spacing=(0.9, 1.3, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "permuted": dict(spacing=(1.1, 0.7, 1.6), direction=(0, 1, 0, 0, 0, -1, 1, 0, 0)),
    # Larger than the crop (192 mm): the region has voxels outside it on every axis.
    "beyond_crop": dict(spacing=(4.0, 3.5, 4.5), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)),
}


def _grid_image(spacing, direction, size=(70, 64, 50)):
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection([float(d) for d in direction])
    image.SetOrigin((-30.0, 12.0, 4.0))
    return image


def _field(seed: int, shift=(0.0, 0.0, 0.0), noise: float = 0.8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"), -1)
    center = torch.tensor([15.0, 17.0, 14.0]) + torch.tensor(shift)
    field = 7.0 - (grid - center).norm(dim=-1) + noise * torch.randn(32, 32, 32, generator=generator)
    return field[None, None]


@pytest.mark.parametrize("name", sorted(AXIS_ALIGNED))
def test_separable_paste_equals_direct_sampling(name):
    image = _grid_image(**AXIS_ALIGNED[name])
    crop = CropGrid.around(index_to_physical(image, (30, 40, 20)))
    paster = CropPaster(crop, image, 32)
    assert paster.axis_aligned
    noise = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    # Nearby fields take the cell-wise update, pure noise the whole-region pass: both must agree.
    for seed, shift in enumerate([(0, 0, 0), (0.4, -0.3, 0.2), (3, 1, -2), None, (0, 0, 0)]):
        logits = noise if shift is None else _field(seed % 3, shift)
        values = paster.values(logits)
        direct = sample_crop_logits(logits, crop, image, paster.region, outside=-np.inf)
        finite = np.isfinite(direct)
        assert np.array_equal(np.isfinite(values), finite)
        np.testing.assert_allclose(values[finite], direct[finite], rtol=0, atol=2e-5)
        mask = paster.mask(logits)  # incremental: updated from the previous call's answer
        assert np.array_equal(mask, (values > 0).astype(np.uint8))
        assert np.array_equal(mask, CropPaster(crop, image, 32).mask(logits))  # and equal to a fresh one


@pytest.mark.parametrize("name", sorted(AXIS_ALIGNED))
def test_first_paste_interpolates_only_the_boundary_cells(name, monkeypatch):
    """A fresh paster fills the cells whose corners agree and interpolates only the mixed ones
    (no whole-region pass), and the answer is still values() > 0 exactly."""
    image = _grid_image(**AXIS_ALIGNED[name])
    crop = CropGrid.around(index_to_physical(image, (30, 40, 20)))
    logits = _field(0, noise=0.0) - 4.0  # a sphere of radius 3 low-res voxels
    expected = (CropPaster(crop, image, 32).values(logits) > 0).astype(np.uint8)
    assert 0 < expected.sum() < expected.size
    interpolate = CropPaster._interpolate

    def lattice_only(self, field, picks=None):
        if picks is None:
            pytest.fail("the whole region was interpolated")
        return interpolate(self, field, picks)

    monkeypatch.setattr(CropPaster, "_interpolate", lattice_only)
    assert np.array_equal(CropPaster(crop, image, 32).mask(logits), expected)


def test_oblique_paste_still_matches():
    image = _grid_image((1.0, 1.2, 1.5), (0.8660254, -0.5, 0, 0.5, 0.8660254, 0, 0, 0, 1), size=(40, 40, 30))
    crop = CropGrid.around(index_to_physical(image, (20, 20, 15)))
    paster = CropPaster(crop, image, 32)
    assert not paster.axis_aligned
    logits = _field(1)
    values = paster.values(logits)
    direct = sample_crop_logits(logits, crop, image, paster.region, outside=-np.inf)
    finite = np.isfinite(direct)
    np.testing.assert_allclose(values[finite], direct[finite], rtol=0, atol=2e-5)
    assert np.array_equal(paster.mask(logits), (values > 0).astype(np.uint8))


def _distance_mm(image: sitk.Image, center_index) -> np.ndarray:
    """Each voxel's distance (mm) from a voxel index, (z, y, x) array."""
    zs, ys, xs = np.indices(image.GetSize()[::-1])
    matrix, _ = image_affine(image)
    index = np.stack([xs, ys, zs], -1).reshape(-1, 3).astype(np.float64)
    distance = np.linalg.norm((index - np.asarray(center_index, dtype=np.float64)) @ matrix.T, axis=1)
    return distance.reshape(image.GetSize()[::-1])


def _ball_image(base: sitk.Image, center_index, radius_mm: float, seed: int = 0) -> sitk.Image:
    """``base``'s grid holding a bright ball (200) on a darker background (100), both with noise (sd 10)."""
    inside = _distance_mm(base, center_index).reshape(-1) < radius_mm
    array = np.where(inside, 200.0, 100.0) + np.random.default_rng(seed).normal(0, 10, inside.size)
    image = sitk.GetImageFromArray(array.reshape(base.GetSize()[::-1]).astype(np.float32))
    image.CopyInformation(base)
    return image


@pytest.mark.parametrize("name", ["lps_1mm", "permuted", "oblique"])
def test_refined_paste_is_exact_and_incremental(name):
    """With the boundary refinement, every path (first paste, cell-wise update, whole-region pass,
    oblique blocks) answers decision_values() > 0, and update() boxes every voxel that changed."""
    geometry = dict(spacing=(1.0, 1.2, 1.5), direction=(0.8660254, -0.5, 0, 0.5, 0.8660254, 0, 0, 0, 1)) if name == "oblique" \
        else AXIS_ALIGNED[name]
    image = _ball_image(_grid_image(size=(120, 112, 88), **geometry), (60, 56, 44), 14.0)
    crop = CropGrid.around(index_to_physical(image, (60, 56, 44)))
    paster = CropPaster(crop, image, 32, BoundaryRefinement())
    assert paster.axis_aligned == (name != "oblique")
    noise = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    previous = None
    for seed, shift in enumerate([(0, 0, 0), (0.4, -0.3, 0.2), (2, 1, -1), None, (0, 0, 0)]):
        # 4 logits per low-res cell: the refined band is about a cell wide, so small shifts take the cell-wise update.
        logits = noise * 6 if shift is None else 4.0 * (_field(seed % 3, shift) - 4.0)
        box = paster.update(logits)
        mask = paster.read()
        assert np.array_equal(mask, (paster.decision_values(logits) > 0).astype(np.uint8))
        assert np.array_equal(mask, CropPaster(crop, image, 32, BoundaryRefinement()).mask(logits))
        if previous is not None:
            outside = np.ones(mask.shape, dtype=bool)
            outside[box.slices()] = False
            assert np.array_equal(mask[outside], previous[outside])
        previous = mask.copy()


def test_refined_cells_at_exactly_minus_band_agree_with_the_voxelwise_answer():
    """Corners all at -band interpolate to values that may round to just above it, inside the band:
    the cell classification keeps a margin, so the cell-wise answer is still decision_values() > 0
    (band 3.0, whose multiples are not exact in binary, and bright voxels there)."""
    base = _grid_image(size=(90, 84, 70), **AXIS_ALIGNED["ras_flip"])
    crop = CropGrid.around(index_to_physical(base, (45, 42, 35)))
    field = np.full((32, 32, 32), -5.0, np.float32)
    field[12:20, 12:20, 12:20] = 5.0
    field[:, :, 24:] = -3.0  # a slab exactly at -band
    logits = torch.from_numpy(field)
    values = CropPaster(crop, base, 32).values(logits)
    rounded_into_band = (np.abs(values) < 3) & (values < -2.9)
    assert rounded_into_band.any()
    image = sitk.GetImageFromArray(np.where((values > 3) | rounded_into_band, 200.0, 100.0).astype(np.float32))
    image.CopyInformation(base)
    paster = CropPaster(crop, image, 32, BoundaryRefinement(band=3.0))
    assert np.array_equal(paster.mask(logits), (paster.decision_values(logits) > 0).astype(np.uint8))


def test_refinement_moves_the_boundary_to_the_intensity_edge():
    """Logits whose zero level set lies 4.5 mm outside a bright ball: refined, the mask follows the
    ball's edge; on an image without an edge (noise only) it stays the logits' own."""
    base = _grid_image(spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), size=(80, 80, 80))
    center = (40, 40, 40)
    crop = CropGrid.around(index_to_physical(base, center))
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"), -1)
    low_res_center = torch.tensor((crop.to_index(index_to_physical(base, center))[0] + 0.5) / 4 - 0.5, dtype=torch.float32)
    logits = (4.0 * (3.0 - (grid - low_res_center).norm(dim=-1)))[None, None]  # radius 3 cells = 18 mm, 4 logits per 6 mm
    ball = _ball_image(base, center, 13.5)
    truth = _distance_mm(base, center) < 13.5

    def dice(mask):
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    plain = CropPaster(crop, ball, 32).mask(logits) > 0
    refined = CropPaster(crop, ball, 32, BoundaryRefinement()).mask(logits) > 0
    assert dice(plain) < 0.8 and dice(refined) > 0.95, (dice(plain), dice(refined))
    flat = _ball_image(base, center, 0.0)  # noise, no ball
    unrefined_flat = CropPaster(crop, flat, 32).mask(logits)
    refined_flat = CropPaster(crop, flat, 32, BoundaryRefinement()).mask(logits)
    assert (unrefined_flat != refined_flat).mean() < 0.002


# -- bf16 on CPUs -----------------------------------------------------------------------------------


def test_bf16_encoder_keeps_bf16_weights_and_fp32_activations(tiny):
    """The CPU bf16 path: weights cast once, every convolution a matrix multiply, outputs near fp32."""
    encoder = FastImageEncoder(tiny.image_encoder, "bf16")
    layers = [m for m in encoder.modules() if isinstance(m, Bf16Linear)]
    assert layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    # bf16 Conv3d is slow on CPUs: the patch embedding and the neck run as bf16 matrix multiplies.
    assert isinstance(encoder.encoder.patch_embed.linear, Bf16Linear)
    assert isinstance(encoder.neck.conv1, Bf16Linear) and isinstance(encoder.neck.conv2, Bf16Linear)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference, fast = tiny.image_encoder(x), encoder(x)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    relative = (fast - reference).norm() / reference.norm()
    assert 1e-4 < relative < 3e-2, relative  # bf16 rounding: visible, small


def test_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    from FastSAM3DLib import quantize

    monkeypatch.setitem(quantize.MEASURED_DICE5_COST, "bf16", 0.0)
    monkeypatch.setattr(quantize, "native_bf16_cpu", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(quantize, "native_bf16_cpu", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) != "bf16"
    monkeypatch.setattr(quantize, "native_bf16_cpu", lambda: True)
    monkeypatch.setitem(quantize.MEASURED_DICE5_COST, "bf16", 0.02)  # too costly: not chosen
    assert resolve_precision("auto", torch.device("cpu")) != "bf16"


def test_cli_offers_every_session_precision():
    from FastSAM3DLib.cli import SESSION_PRECISIONS
    from FastSAM3DLib.session import PRECISIONS

    assert tuple(SESSION_PRECISIONS) == tuple(PRECISIONS)


def test_the_fast_path_follows_weights_that_were_replaced():
    """Found by review: the fast path was rebuilt only when a parameter changed in place, so after
    ``load_state_dict(assign=True)`` (or a move to another dtype or device) it kept the old weights."""
    from FastSAM3DLib import build_model
    from FastSAM3DLib.quantize import fast_path

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    torch.manual_seed(1)
    other = build_model("tiny")
    before = fast_path(model, "fp32-fast")
    model.load_state_dict(other.state_dict(), assign=True)
    model.eval()
    after = fast_path(model, "fp32-fast")
    assert after is not before
    embedding, coords = torch.randn(1, 48, 8, 8, 8), torch.rand(1, 2, 3) * 127
    labels, previous = torch.tensor([[1, 0]]), torch.zeros(1, 1, 32, 32, 32)
    with torch.no_grad():
        exact = model.decode(embedding, coords, labels, previous)[0]
        fast = after.decode(embedding, coords, labels, previous)[0]
    assert torch.allclose(exact, fast, atol=1e-4, rtol=1e-4)
    model.double()
    assert fast_path(model, "fp32-fast") is not after
