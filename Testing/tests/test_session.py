"""The interactive session: geometry, caching, undo/reset, click consistency, uncertainty, errors.

Geometry tests use generated images with oblique/anisotropic/flipped grids where the right answer
is known; real anatomy comes from Colin27 (Debian mricron-data). The model is the tiny test
configuration with fixed weights, or — where an answer must be anatomically right — a model whose
decoder is replaced by an oracle of known logits (``Testing/oracles.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import ImageError, PromptError, Session, build_model
from FastSAM3DLib.paste import BoundaryRefinement
from FastSAM3DLib.preprocess import index_to_physical
from FastSAM3DLib.quantize import fast_path
from oracles import sphere_oracle_model


def _image(size=(40, 50, 30), spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array = rng.normal(100, 10, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _rotation(ax: float, ay: float, az: float) -> tuple:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).flatten())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


GEOMETRIES = {
    "identity": dict(spacing=(1.0, 1.0, 1.0)),
    "anisotropic": dict(spacing=(0.7, 0.9, 3.0)),
    "coarse": dict(spacing=(2.5, 2.5, 2.5), size=(30, 30, 30)),
    "flipped_ras": dict(spacing=(1.2, 1.2, 1.2), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), origin=(40.0, 50.0, -10.0)),
    "oblique": dict(spacing=(1.0, 1.3, 2.0), direction=_rotation(0.3, -0.2, 0.5), origin=(-12.0, 7.0, 3.0)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_sphere_comes_back_in_the_image_geometry(name):
    """A 12 mm sphere predicted around a click is returned on the user's exact grid, in the right place."""
    params = dict(GEOMETRIES[name])
    size = params.pop("size", (48, 48, 32))
    image = _image(size=size, **params)
    model, _ = sphere_oracle_model(12.0)
    # The logits alone: this is the geometry's exact sphere (the boundary refinement would read the
    # noise image's intensities; it is tested in test_speed_modes.py).
    session = Session(model, prefetch=False, refinement=None)
    session.set_image(image)
    center_index = (np.asarray(image.GetSize()) - 1) / 2.0
    center = index_to_physical(image, center_index)
    session.add_point(center)
    mask = session.predict()
    assert mask.GetSize() == image.GetSize()
    assert mask.GetSpacing() == image.GetSpacing()
    assert mask.GetOrigin() == image.GetOrigin()
    assert mask.GetDirection() == image.GetDirection()
    assert mask.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayFromImage(mask).astype(bool)
    # The expected sphere, computed directly in physical space on the user's grid.
    zs, ys, xs = np.indices(array.shape)
    physical = np.stack([xs, ys, zs], -1).reshape(-1, 3) @ (
        np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    ).T + np.asarray(image.GetOrigin())
    distance = np.linalg.norm(physical - center, axis=1).reshape(array.shape)
    assert array[distance < 12.0 - 1.6].all()  # a trilinear band of one low-res cell (6 mm / 2 + slack)
    assert not array[distance > 12.0 + 1.6].any()
    expected_ml = 4 / 3 * np.pi * 12.0**3 / 1000
    measured_ml = array.sum() * np.prod(image.GetSpacing()) / 1000
    assert abs(measured_ml - expected_ml) / expected_ml < 0.15


def test_mask_matches_direct_sampling_everywhere(tiny):
    """The block-wise paste-back equals interpolating every voxel, with the boundary refinement
    applied to each (no shortcut changes an answer)."""
    image = _image(size=(60, 50, 40), spacing=(0.8, 1.1, 2.0), direction=_rotation(0.2, 0.1, -0.3))
    session = Session(tiny, prefetch=False)
    session.set_image(image)
    session.add_point(index_to_physical(image, (30, 25, 20)))
    mask = sitk.GetArrayFromImage(session.predict())
    state = session._objects[0]
    crop = state.crops[0]
    paster = session._paster(crop)
    direct = (paster.decision_values(state.logits[crop]) > 0).astype(np.uint8)
    full = np.zeros_like(mask)
    full[paster.region.slices()] = direct
    differing = np.argwhere(full != mask)
    # Only the clicked voxel may differ (click consistency is enforced there).
    assert len(differing) <= 1


def test_changing_the_refinement_keeps_the_work_and_updates_the_view():
    """Turning the boundary refinement off and on again re-decides the mask from the kept logits:
    no new embedding, the answer a fresh session with that setting gives, and a live view kept by
    predict_changes stays equal to predict."""
    image = _ball_image_for_session()
    session = _clicked_ball_session(image)
    view = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    region, local = session.predict_region()
    view[region.slices()] = local
    calls = session.encoder_calls
    for refinement in (None, BoundaryRefinement()):
        session.refinement = refinement
        box, delta = session.predict_changes()
        view[box.slices()] = delta
        fresh = _clicked_ball_session(image, refinement=refinement)
        expected = sitk.GetArrayFromImage(fresh.predict())
        assert np.array_equal(view, expected) and np.array_equal(sitk.GetArrayFromImage(session.predict()), expected)
        fresh.close()
    assert session.encoder_calls == calls
    session.refinement = None
    without = sitk.GetArrayFromImage(session.predict())
    # The setting matters here: the oracle's 30 mm sphere, refined, shrinks to the image's 24 mm ball.
    assert without.sum() > 1.5 * view.sum()
    session.close()


def test_a_refinement_change_during_a_prediction_affects_only_the_next():
    """The setter may run on another thread while a prediction pastes: that prediction finishes with
    the pasters it started with (a whole mask, not the empty one of a paster made mid-way), the next
    answers with the new setting."""
    image = _ball_image_for_session()
    session = _clicked_ball_session(image)
    enforced = session._enforced

    def change_midway(state):  # runs between the paste's update and its read, as a setter on another thread could
        session.refinement = None
        session._enforced = enforced
        return enforced(state)

    session._enforced = change_midway
    _, during = session.predict_region()
    _, after = session.predict_region()
    reference = _clicked_ball_session(image)
    assert np.array_equal(during, reference.predict_region()[1])  # refined, as when it started
    assert after.sum() > 1.5 * during.sum() and session.click_violations == 0
    session.close()
    reference.close()


def _clicked_ball_session(image: sitk.Image, **options) -> Session:
    """A session on ``image`` with a 30 mm sphere oracle, clicked at the centre (60, 60, 50)."""
    model, _ = sphere_oracle_model(30.0)
    session = Session(model, prefetch=False, **options)
    session.set_image(image)
    session.add_point(index_to_physical(image, (60, 60, 50)))
    return session


def _ball_image_for_session() -> sitk.Image:
    """120 x 120 x 100 voxels of 1 mm: a bright ball of radius 24 mm (200) in a darker background (100), noise sd 10."""
    zs, ys, xs = np.indices((100, 120, 120))
    inside = (xs - 60) ** 2 + (ys - 60) ** 2 + (zs - 50) ** 2 < 24.0**2
    array = np.where(inside, 200.0, 100.0) + np.random.default_rng(3).normal(0, 10, inside.shape)
    return sitk.GetImageFromArray(array.astype(np.float32))


def test_later_clicks_in_the_crop_do_not_re_embed(tiny):
    image = _image(size=(60, 60, 60))
    session = Session(tiny, prefetch=True)
    session.set_image(image, wait=True)
    assert session.encoder_calls == 1
    center = index_to_physical(image, (30, 30, 30))
    for offset in ([0, 0, 0], [3, -2, 1], [-4, 4, 0], [5, 0, -5]):
        session.add_point(center + np.asarray(offset), positive=offset[0] >= 0)
        session.predict()
    assert session.encoder_calls == 1
    # A click far outside the first crop opens a second crop (and only then embeds again).
    big = _image(size=(300, 60, 60), spacing=(1.5, 1.0, 1.0))
    session.set_image(big, wait=True)
    calls = session.encoder_calls
    session.add_point(index_to_physical(big, (5, 30, 30)))
    session.predict()
    session.add_point(index_to_physical(big, (290, 30, 30)))
    session.predict()
    assert session.encoder_calls == calls + 2  # the prefetched centre crop covered neither end
    assert len(session._objects[0].crops) == 2


def test_undo_restores_the_previous_mask_exactly_and_reset_clears(tiny):
    image = _image(size=(50, 50, 50))
    session = Session(tiny, prefetch=False)
    session.set_image(image)
    c = index_to_physical(image, (25, 25, 25))
    session.add_point(c)
    first = sitk.GetArrayFromImage(session.predict())
    session.add_point(c + np.array([4.0, 0, 0]), positive=False)
    second = sitk.GetArrayFromImage(session.predict())
    assert session.undo()
    again = sitk.GetArrayFromImage(session.predict())
    assert np.array_equal(first, again)
    session.add_point(c + np.array([4.0, 0, 0]), positive=False)
    assert np.array_equal(second, sitk.GetArrayFromImage(session.predict()))
    session.reset()
    assert session.prompts() == []
    assert not sitk.GetArrayFromImage(session.predict()).any()
    assert not session.undo()


def test_clicked_voxels_are_always_consistent(tiny):
    image = _image(size=(50, 50, 50))
    session = Session(tiny, prefetch=False)
    session.set_image(image)
    rng = np.random.default_rng(1)
    clicks = []
    for _ in range(6):
        index = rng.integers(10, 40, 3)
        positive = bool(rng.integers(0, 2))
        clicks.append((index, positive))
        session.add_point_voxel(index, positive)
        mask = sitk.GetArrayFromImage(session.predict())
        for earlier, label in clicks:
            latest = [p for i, p in clicks if np.array_equal(i, earlier)][-1]
            assert mask[tuple(earlier[::-1])] == int(latest)
    assert session.clicks_checked == 6
    assert 0 <= session.click_violations <= 6


def test_several_objects_share_embeddings(tiny):
    image = _image(size=(50, 50, 50))
    session = Session(tiny, prefetch=False)
    session.set_image(image)
    other = session.new_object()
    session.add_point(index_to_physical(image, (20, 25, 25)))
    session.add_point(index_to_physical(image, (30, 25, 25)), object=other)
    session.predict()
    session.predict(object=other)
    assert session.encoder_calls == 1
    assert session.objects == [0, other]
    with pytest.raises(PromptError, match="object 7 does not exist"):
        session.add_point((0, 0, 0), object=7)


def test_embedding_cache_is_bounded_by_bytes(tiny):
    image = _image(size=(400, 40, 40), spacing=(1.5, 1.0, 1.0))
    one = 48 * 8 * 8 * 8 * 4
    session = Session(tiny, prefetch=False, cache_bytes=2 * one)
    session.set_image(image)
    for x in (10, 150, 290, 390):
        session.add_point(index_to_physical(image, (x, 20, 20)))
        session.predict()
    assert session.cached_bytes() <= 2 * one
    assert session.encoder_calls == 4
    # Found by review: evicted embeddings stayed referenced (all four in memory) and were served again.
    session.add_point(index_to_physical(image, (10, 20, 20)), object=session.new_object())
    session.predict(object=1)
    assert session.encoder_calls == 5  # its crop was evicted: embedded again, and cached again


def test_uncertainty_methods_and_scaling(tiny):
    image = _image(size=(40, 40, 40))
    session = Session(tiny, prefetch=False)
    session.set_image(image)
    session.add_point(index_to_physical(image, (20, 20, 20)))
    for method in ("mc-dropout", "click-jitter"):
        mean, spread = session.uncertainty(n=4, method=method)
        assert mean.GetSize() == image.GetSize() and spread.GetSize() == image.GetSize()
        m, u = sitk.GetArrayFromImage(mean), sitk.GetArrayFromImage(spread)
        assert 0.0 <= m.min() and m.max() <= 1.0
        assert 0.0 <= u.min() and u.max() <= 1.0 and u.max() > 0
    again, _ = session.uncertainty(n=4, method="mc-dropout")
    first, _ = session.uncertainty(n=4, method="mc-dropout")
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(first))  # seeded
    # dropout is switched off again afterwards: plain predictions are deterministic
    assert not any(m.training for m in tiny.mask_decoder.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match="uncertainty method"):
        session.uncertainty(method="ensembles")


def test_box_prompt_is_clipped_to_the_box():
    image = _image(size=(60, 60, 60))
    model, _ = sphere_oracle_model(40.0)  # a sphere much bigger than the box
    session = Session(model, prefetch=False)
    session.set_image(image)
    a, b = index_to_physical(image, (20, 20, 20)), index_to_physical(image, (40, 36, 30))
    session.add_box(a, b)
    mask = sitk.GetArrayFromImage(session.predict())
    nz = np.argwhere(mask)
    assert nz.size
    low, high = nz.min(0)[::-1], nz.max(0)[::-1]  # x, y, z
    # Exactly the voxels whose centres the box holds (there was a 10 % margin around it): the
    # sphere covers the box, so its mask is the box.
    assert low.tolist() == [20, 20, 20] and high.tolist() == [40, 36, 30]
    assert mask.sum() == 21 * 17 * 11
    with pytest.raises(PromptError, match="is flat"):
        session.add_box(a, a + np.array([5.0, 5.0, 0.0]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sitk.Image([10, 10], sitk.sitkFloat32) + 1, "expected a 3D volume, got a 2D image"),
        (lambda: sitk.GetImageFromArray(np.random.rand(3, 10, 10, 10).astype(np.float32), isVector=False), "expected a 3D volume, got a 4D image"),
        (lambda: sitk.Image([10, 10, 10], sitk.sitkVectorFloat32, 3), "single-channel"),
        (lambda: sitk.Image([10, 10, 10], sitk.sitkFloat32) + 5, "every voxel has the same value"),
        (lambda: _nan_image(), "NaN or infinite"),
    ],
)
def test_bad_images_are_refused(tiny, make, message):
    session = Session(tiny, prefetch=False)
    with pytest.raises(ImageError, match=message):
        session.set_image(make())


def _nan_image() -> sitk.Image:
    image = _image(size=(10, 10, 10))
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def test_bad_prompts_are_refused(tiny):
    image = _image(size=(20, 20, 20))
    session = Session(tiny, prefetch=False)
    with pytest.raises(RuntimeError, match="no image is set"):
        session.add_point((0, 0, 0))
    session.set_image(image)
    with pytest.raises(PromptError, match=r"outside the image: it falls at voxel \(100.0, 5.0, 5.0\)"):
        session.add_point((100.0, 5.0, 5.0))
    with pytest.raises(PromptError, match="three finite numbers"):
        session.add_point((1.0, float("nan"), 2.0))
    assert session.prompts() == []


def test_background_embedding_is_cancelled_by_a_new_image():
    torch.manual_seed(0)
    model = build_model("fastsam3d")  # big enough that the embedding is still running
    session = Session(model, prefetch=True)
    session.set_image(_image(size=(40, 40, 40), seed=1))
    future = session._ensure_embedding(next(iter(session._pending)))
    session.set_image(_image(size=(30, 30, 30), seed=2), wait=False)
    from FastSAM3DLib.session import EmbeddingCancelled

    with pytest.raises(EmbeddingCancelled):
        future.result(timeout=60)
    session.close()
    assert session.encoder_calls == 0


def test_predict_changes_touches_only_what_changed():
    """A live view kept up to date by ``predict_changes`` alone equals ``predict`` after every step,
    and a later click that changes little hands out a small box, not the volume."""
    image = _image(size=(120, 120, 100))
    model, _ = sphere_oracle_model(10.0)
    session = Session(model, prefetch=False)
    session.set_image(image)
    view = np.zeros(image.GetSize()[::-1], dtype=np.uint8)

    def step(object=0):
        box, delta = session.predict_changes(object)
        view[box.slices()] = delta
        assert np.array_equal(view, sitk.GetArrayFromImage(session.predict(object)))
        return box

    center = index_to_physical(image, (60, 60, 50))
    session.add_point(center)
    region, local = session.predict_region()
    view[region.slices()] = local
    session.add_point(index_to_physical(image, (60, 60, 50)) + np.array([6.0, 0.0, 0.0]), positive=False)
    box = step()
    assert not box.empty and np.prod(box.size) < 0.02 * np.prod(region.size), (box, region)  # the voxels that changed
    assert view[50, 60, 66] == 0  # the negative click's voxel, inside the sphere
    assert step().empty  # nothing new: nothing to write

    other = session.new_object()  # another object decoded in the same crop ...
    session.add_point(index_to_physical(image, (30, 30, 30)), object=other)
    session.predict_region(other)
    session.add_point(center + np.array([0.0, 4.0, 0.0]))  # ... then this object again: still exact
    step()
    assert session.undo()
    step()
    session.reset()
    step()  # the old mask is cleared
    assert not view.any()
    session.close()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_lone_first_click_takes_the_candidate_with_the_highest_predicted_iou(precision):
    """A model trained with candidate masks answers a lone positive first click with the candidate
    its IoU head rates best (SAM's ambiguity rule); later clicks, and models without candidates,
    get the single-mask output."""
    torch.manual_seed(1)
    model = build_model("tiny")
    image = _image(size=(50, 50, 50))
    first, second = index_to_physical(image, (25, 25, 25)), index_to_physical(image, (28, 24, 25))

    def run(trained: bool):
        model.config["first_click_multimask"] = trained
        session = Session(model, prefetch=False, precision=precision)
        session.set_image(image)
        session.add_point(first)
        session.predict()
        state = session._objects[0]
        crop = state.crops[0]
        after_first, iou_first = state.logits[crop].clone(), session.predicted_iou()
        session.add_point(second)
        session.predict()
        return session, crop, after_first, iou_first, state.logits[crop]

    session, crop, after_first, iou_first, after_second = run(trained=True)
    embedding = session._embedding(crop)
    coords, labels, _ = session._crop_prompts(session._objects[0], crop)
    coords, labels = torch.from_numpy(coords)[None], torch.from_numpy(labels)[None]
    # The session's decoder: the model's own (fp32) or the int8 fast path.
    decode = fast_path(model, session.precision).decode if session._fast else model.decode
    zeros = torch.zeros((1, 1, *model.low_res_size))
    with torch.inference_mode():
        candidates, iou = decode(embedding, coords[:, :1], labels[:, :1], zeros, multimask_output=True)
        single = decode(embedding, coords[:, :1], labels[:, :1], zeros)[0].float()
        refined = decode(embedding, coords, labels, after_first)[0].float()
    best = int(iou[0].argmax())
    torch.testing.assert_close(after_first, candidates[:, best : best + 1])
    assert iou_first == pytest.approx(float(iou.max()))
    assert not torch.allclose(after_first, single), "the candidates of a random model differ from mask 0"
    torch.testing.assert_close(after_second, refined)  # the second click refines the chosen candidate with mask 0

    _, _, untrained_first, _, _ = run(trained=False)
    torch.testing.assert_close(untrained_first, single)


def test_uncertainty_of_a_lone_first_click_describes_the_chosen_candidate():
    """With dropout off, the mean of the stochastic decodes is exactly the mask shown: the decodes
    redo the candidate choice instead of refining the candidate with mask 0."""
    torch.manual_seed(1)
    model = build_model("tiny")
    model.config.update(first_click_multimask=True, decoder_dropout=0.0)
    image = _image(size=(50, 50, 50))
    session = Session(model, prefetch=False, precision="fp32")
    session.mc_dropout_rate = 0.0
    session.set_image(image)
    session.add_point(index_to_physical(image, (25, 25, 25)))
    ious, _ = session.candidates()
    for choice in (None, int(np.argmin(ious))):  # the decoder's pick, then the user's choice
        if choice is not None:
            session.choose_candidate(choice)
        mask = sitk.GetArrayFromImage(session.predict()).astype(bool)
        mean, _ = session.uncertainty(n=2, method="mc-dropout")
        agree = (sitk.GetArrayFromImage(mean) > 0.5) == mask
        # Probabilities and logits are interpolated separately onto the grid: a few boundary voxels may part.
        assert agree.mean() > 0.999, f"candidate {choice}: {(~agree).sum()} voxels differ"


def test_choosing_another_candidate_shows_it_is_refined_by_the_next_click_and_undoes():
    """The user may prefer another candidate of a lone click to the IoU head's pick: it is shown,
    the next click refines it, and undo steps back through the click and the choice exactly."""
    torch.manual_seed(1)
    model = build_model("tiny")
    model.config["first_click_multimask"] = True
    image = _image(size=(50, 50, 50))
    session = Session(model, prefetch=False, precision="fp32")
    session.set_image(image)
    session.add_point(index_to_physical(image, (25, 25, 25)))
    picked = sitk.GetArrayFromImage(session.predict())
    ious, shown = session.candidates()
    assert len(ious) == 3 and shown is None
    assert session.predicted_iou() == pytest.approx(max(ious))
    other = int(np.argmin(ious))
    state = session._objects[0]
    crop = state.crops[0]

    session.choose_candidate(other)
    assert session.candidates() == (ious, other)
    assert session.predicted_iou() == pytest.approx(ious[other])
    chosen = state.logits[crop].clone()
    torch.testing.assert_close(chosen, state.candidates[crop][0][other][None, None])
    chosen_mask = sitk.GetArrayFromImage(session.predict())
    assert not np.array_equal(chosen_mask, picked), "a random model's candidates differ"
    session.choose_candidate(other)  # already shown: no new undo step
    assert len(state.history) == 2

    session.add_point(index_to_physical(image, (28, 24, 25)))
    session.predict()
    coords, labels, _ = session._crop_prompts(state, crop)
    with torch.inference_mode():
        refined = model.decode(session._embedding(crop), torch.from_numpy(coords)[None], torch.from_numpy(labels)[None], chosen)[0]
    torch.testing.assert_close(state.logits[crop], refined.float())
    assert session.candidates() == ([], None)
    with pytest.raises(PromptError, match="no candidate masks"):
        session.choose_candidate(0)

    assert session.undo()  # the second click
    assert session.candidates() == (ious, other)
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), chosen_mask)
    assert session.undo()  # the choice
    assert session.candidates() == (ious, None)
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), picked)
    with pytest.raises(PromptError, match="candidate 3 does not exist: there are 3"):
        session.choose_candidate(3)

    # Asking for the candidates decodes the click: that time counts in the next result's timings.
    other_object = session.new_object()
    session.add_point(index_to_physical(image, (20, 25, 25)), object=other_object)
    session.candidates(other_object)
    session.predict_region(other_object)
    timings = session.last_timings
    assert timings["decode_s"] > 0 and timings["total_s"] >= timings["decode_s"] + timings["paste_s"]


def test_a_crop_opened_by_a_later_click_keeps_the_single_mask_output():
    """Candidates answer only the object's very first click: a later click far away opens a new
    crop, decoded with the single-mask output like any later click."""
    torch.manual_seed(1)
    model = build_model("tiny")
    model.config["first_click_multimask"] = True
    big = _image(size=(300, 60, 60), spacing=(1.5, 1.0, 1.0))
    session = Session(model, prefetch=False, precision="fp32")
    session.set_image(big)
    session.add_point(index_to_physical(big, (5, 30, 30)))
    session.predict()
    session.add_point(index_to_physical(big, (290, 30, 30)))
    session.predict()
    state = session._objects[0]
    assert len(state.crops) == 2
    assert [crop in state.candidates for crop in state.crops] == [True, False]
    assert session.candidates() == ([], None)  # two prompts: nothing left to choose


def test_a_click_on_the_image_face_holds_the_voxel_on_that_face(tiny):
    """Clicks are accepted up to half a voxel outside the image; the clicked voxel is the nearest one
    (halves round up, as ITK does), so the click is honoured there too."""
    image = _image(size=(30, 50, 40), spacing=(0.8, 0.8, 2.0))
    for index, positive in (((29.5, 25, 15), False), ((29.5, 25, 15), True), ((-0.5, 25, 15), False), ((20, 49.5, 39.5), False),
                            ((20, 25, 20.5), False)):
        session = Session(tiny, prefetch=False, precision="fp32")
        session.set_image(image)
        session.add_point_voxel((15, 25, 20))
        session.add_point_voxel(index, positive=positive)
        mask = sitk.GetArrayFromImage(session.predict())
        nearest = [int(min(max(np.floor(v + 0.5), 0), n - 1)) for v, n in zip(index, image.GetSize())]
        assert mask[nearest[2], nearest[1], nearest[0]] == int(positive), (index, positive)


def test_choosing_a_candidate_takes_a_whole_number_only(tiny):
    torch.manual_seed(0)
    model = build_model("tiny")
    model.config["first_click_multimask"] = True
    session = Session(model, prefetch=False, precision="fp32")
    session.set_image(_image())
    session.add_point_voxel((20, 25, 15))
    before = sitk.GetArrayFromImage(session.predict())
    for bad in (True, 1.5, "1"):
        with pytest.raises(PromptError, match="candidate must be None or a whole number"):
            session.choose_candidate(bad)
    assert np.array_equal(sitk.GetArrayFromImage(session.predict()), before)  # the object still works
    session.choose_candidate(np.int64(2))
    assert session.candidates()[1] == 2
    assert session.undo() and session.candidates()[1] is None  # the choice is undone, not the click


def test_uncertainty_leaves_the_callers_random_state_and_checks_n(tiny):
    session = Session(tiny, prefetch=False, precision="fp32")
    session.set_image(_image())
    session.add_point_voxel((20, 25, 15))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    session.uncertainty(n=2)
    assert torch.equal(torch.rand(3), expected)
    for bad in (2.5, 1, True):
        with pytest.raises(ValueError, match="whole number of at least 2"):
            session.uncertainty(n=bad)


def test_a_new_session_does_not_switch_off_another_threads_mc_dropout():
    """Creating a Session puts the shared model in eval mode: under the model's lock, so an MC-dropout
    decode running in another thread keeps its dropout (its variance was 0 in 10 of 10 runs)."""
    import threading

    torch.manual_seed(0)
    model = build_model("tiny")
    session = Session(model, prefetch=False, precision="fp32", mc_dropout_rate=0.5)
    session.set_image(_image(size=(40, 40, 40)))
    session.add_point_voxel((20, 20, 20))
    session.predict()
    stop = threading.Event()

    def create_sessions():
        while not stop.is_set():
            Session(model, prefetch=False, precision="fp32").close()

    creator = threading.Thread(target=create_sessions)
    creator.start()
    try:
        variances = [float(sitk.GetArrayFromImage(session.uncertainty(n=4, measure="variance")[1]).mean()) for _ in range(6)]
    finally:
        stop.set()
        creator.join()
    assert min(variances) > 0, variances


def test_shifted_and_huge_intensities_give_the_same_mask(tiny):
    """An image whose values are all negative (a shifted MR) or huge is normalised like the original:
    its crop was all zeros (no voxel > 0, or a float32 standard deviation overflowing to inf), so the
    model saw a blank crop whatever the image held."""
    rng = np.random.default_rng(3)
    array = np.zeros((40, 50, 44), np.float32)
    zz, yy, xx = np.mgrid[:40, :50, :44]
    array[(zz - 20) ** 2 + (yy - 25) ** 2 + (xx - 22) ** 2 < 12**2] = 200.0
    array[8:32, 10:40, 8:36] += rng.normal(60, 10, (24, 30, 28)).astype(np.float32)

    def mask(values):
        image = sitk.GetImageFromArray(values)
        image.SetSpacing((1.5, 1.5, 1.5))
        session = Session(tiny, prefetch=False, precision="fp32", refinement=None)
        session.set_image(image)
        session.add_point_voxel((22, 25, 20))
        session.add_point_voxel((5, 5, 5), positive=False)
        return sitk.GetArrayFromImage(session.predict()).astype(bool)

    original = mask(array)
    noise = mask(-rng.uniform(1, 500, array.shape).astype(np.float32))
    for variant in (array - 1000.0, array * np.float32(1e18)):
        shifted = mask(variant.astype(np.float32))
        assert 2 * (shifted & original).sum() / (shifted.sum() + original.sum()) > 0.99
    assert (noise != original).any()  # the comparison can tell images apart


def test_a_closed_session_says_so_and_records_nothing(tiny):
    with Session(tiny, prefetch=False, precision="fp32") as session:
        session.set_image(_image())
        session.add_point_voxel((20, 25, 15))
        session.predict()  # found by review: afterwards its cached result was still given
    for use in (lambda: session.add_point_voxel((10, 10, 10)), lambda: session.set_image(_image()), session.predict,
                session.predict_changes, session.undo, session.candidates, session.predicted_iou, session.new_object):
        with pytest.raises(RuntimeError, match="this Session was closed"):
            use()
    assert len(session._objects[0].prompts) == 1


def test_a_box_may_reach_past_the_image_but_its_centre_must_be_in_it(tiny):
    image = _image(size=(40, 50, 30))
    session = Session(tiny, prefetch=False, precision="fp32", refinement=None)
    session.set_image(image)
    session.add_box(index_to_physical(image, (30, 40, 20)), index_to_physical(image, (44, 54, 34)))  # past three faces
    mask = sitk.GetArrayFromImage(session.predict())
    nz = np.argwhere(mask)
    assert nz.size and np.all(nz.min(0)[::-1] >= [30, 40, 20])
    with pytest.raises(PromptError, match="the centre of box .* is outside the image"):
        session.add_box(index_to_physical(image, (45, 10, 10)), index_to_physical(image, (60, 20, 20)))


def test_the_predicted_iou_is_that_of_the_newest_prompts_crop(tiny):
    """Found by review: ``predicted_iou`` reported the crop added last, not the one the newest prompt
    was decoded in (the CLI's ``--json`` printed it)."""
    image = _image(size=(400, 20, 20), spacing=(2.0, 2.0, 2.0))
    session = Session(tiny, prefetch=False, precision="fp32")
    session.set_image(image)
    assert session.predicted_iou() is None
    session.add_point_voxel((20, 10, 10))
    session.predict()
    session.add_point_voxel((380, 10, 10))
    session.predict()
    state = session._objects[0]
    first, second = state.crops
    session.add_point_voxel((25, 12, 10), positive=False)
    session.predict()
    assert state.iou[first] != state.iou[second]
    assert session.predicted_iou() == state.iou[first]


@pytest.mark.parametrize("mode", ["mr", "ct"])
def test_an_image_of_one_foreground_value_gives_bounded_model_input(mode):
    """Found by review: a binary mask, a label map or a CT clipped at its window's top has a
    foreground of one value; its standard deviation 0 made the rest of the crop about -1e10."""
    from FastSAM3DLib.crops import IntensitySettings, normalize_crop

    array = np.zeros((64,) * 3, np.float32)
    array[20:40, 20:40, 20:40] = 100.0
    if mode == "ct":
        array = np.where(array > 0, 500.0, -1000.0).astype(np.float32)  # bone above the window, air
    normalised = normalize_crop(array, IntensitySettings(mode))
    assert set(np.unique(normalised).round(6)) == {-1.0, 0.0}
    assert not normalize_crop(np.full((8,) * 3, 7.0, np.float32)).any()  # one value everywhere: zeros, as before


def test_crops_outside_a_ct_image_are_air_in_training_and_evaluation_as_in_the_session():
    """Found by review: ``crop_tensor`` (the quick evaluation) and the training pool padded outside the
    image with 0 (soft tissue in HU), where the session pads CT with the window's low end (air)."""
    from FastSAM3DLib.crops import IntensitySettings
    from FastSAM3DLib.preprocess import CropGrid, crop_tensor
    from FastSAM3DLib.train.pool import prepare_crop

    array = np.full((60,) * 3, -1000, np.int16)
    array[10:50, 10:50, 10:50] = np.random.default_rng(0).integers(20, 80, (40,) * 3)
    image = sitk.GetImageFromArray(array)
    ct = IntensitySettings("ct")
    corner = index_to_physical(image, (59, 59, 59))
    crop = CropGrid.around(corner)
    tensor = crop_tensor(image, crop, ct)[0, 0].numpy()
    label = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    label.CopyInformation(image)
    pooled, _ = prepare_crop(image, label, np.random.default_rng(0), augment_crop=False, intensity=ct, center_lps=corner)
    # Crop voxel (0, 0, 0) lies outside the image, (66, 66, 62) in its air corner (-1000 HU), (76, 76, 50) in tissue.
    for normalised in (tensor, pooled):
        assert normalised[0, 0, 0] == pytest.approx(normalised[66, 66, 62]) and normalised[0, 0, 0] < normalised[76, 76, 50]


def test_without_crop_reuse_the_same_clicks_give_the_same_mask_whatever_came_before(tiny):
    """Found by review: an object's first click was decoded in whatever crop was already embedded
    (the prefetched one, another object's), so a saved click log replayed to another label map
    unless the object order and the prefetch were replayed too."""
    image = _image(size=(60, 60, 40), spacing=(1.5, 1.5, 1.5))

    def mask(first_other: bool, reuse: bool):
        session = Session(tiny, precision="fp32", prefetch=True, reuse_crops=reuse)
        session.set_image(image, wait=True)
        target = session.new_object()
        if first_other:
            other = session.new_object()
            session.add_point_voxel((20, 30, 20), object=other)
            session.predict(object=other)
        session.add_point_voxel((38, 28, 22), object=target)
        return sitk.GetArrayFromImage(session.predict(object=target)), session.encoder_calls

    alone, calls = mask(False, reuse=False)
    assert calls == 2  # the prefetched crop, and one centred on the click
    assert np.array_equal(mask(True, reuse=False)[0], alone)
    reused, calls = mask(False, reuse=True)
    assert calls == 1 and not np.array_equal(reused, alone)  # the prefetched crop: another answer


def test_a_crop_holding_only_exclude_clicks_adds_nothing_to_the_object(tiny):
    """Found by review: an exclude click far from the object opened a crop of its own, decoded from
    that click alone, and whatever the model made of it was added to the object's mask."""
    image = _image(size=(400, 20, 20), spacing=(2.0, 2.0, 2.0))
    session = Session(tiny, prefetch=False, precision="fp32", refinement=None)
    session.set_image(image)
    session.add_point_voxel((20, 10, 10))
    first = sitk.GetArrayFromImage(session.predict())
    session.add_point_voxel((300, 10, 10), positive=False)  # 560 mm away: a crop of its own
    assert len(session._objects[0].crops) == 2
    after = sitk.GetArrayFromImage(session.predict())
    assert not after[:, :, 120:].any()  # beyond the first crop: nothing
    assert np.array_equal(after, first)
    session.add_point_voxel((310, 10, 10))  # an include click there decodes that crop
    assert sitk.GetArrayFromImage(session.predict())[10, 10, 310] == 1


def test_an_exclude_click_refines_the_object_in_newest_click_mode(tiny):
    """Found by the diff review: with ``click_mode="newest"`` (one prompt decoded) every exclude click
    counted as a crop of exclude clicks alone, and the object vanished."""
    session = Session(tiny, prefetch=False, precision="fp32", click_mode="newest", refinement=None)
    session.set_image(_image())
    session.add_point_voxel((20, 25, 15))
    assert sitk.GetArrayFromImage(session.predict()).any()
    session.add_point_voxel((22, 25, 15), positive=False)
    after = sitk.GetArrayFromImage(session.predict())
    assert after.any() and after[15, 25, 22] == 0 and session.predicted_iou() is not None


def test_a_box_wider_than_the_models_view_says_what_is_left_out(tiny, caplog):
    """Found by review: a box wider than the 192 mm crop was decoded in one crop, clipped to it
    without a word."""
    image = _image(size=(200, 40, 40), spacing=(1.5, 1.5, 1.5))
    session = Session(tiny, prefetch=False, precision="fp32")
    session.set_image(image)
    with caplog.at_level("WARNING", logger="FastSAM3DLib.session"):
        session.add_box(index_to_physical(image, (10, 5, 5)), index_to_physical(image, (60, 30, 30)))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="FastSAM3DLib.session"):
        session.add_box(index_to_physical(image, (5, 5, 5)), index_to_physical(image, (190, 30, 30)))
    assert "the model sees 192 mm at a time" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mc_dropout_on_cuda_is_reproducible_and_leaves_the_callers_cuda_random_state():
    """Found by review: the seed reached only the CPU generator, which CUDA's dropout does not use."""
    torch.manual_seed(0)
    session = Session(build_model("tiny"), device="cuda", precision="fp32", prefetch=False)
    session.set_image(_image())
    session.add_point_voxel((20, 25, 15))
    session.predict()
    state = torch.cuda.get_rng_state()
    first = sitk.GetArrayFromImage(session.uncertainty(n=4, seed=3)[1])
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert np.array_equal(sitk.GetArrayFromImage(session.uncertainty(n=4, seed=3)[1]), first)
