"""Property-based tests (hypothesis) of the session over random geometry and random prompt sequences.

For any grid (size, spacing, a random rotation with or without a flip, origin) and any sequence of
clicks, boxes and undos:
- every output (mask, probability) has exactly the input's size, spacing, origin and direction;
- nothing changes outside the crops: ``predict_region``'s region holds every non-zero voxel of
  ``predict``, and no voxel whose centre lies outside all of the object's crops is ever set;
- ``undo`` restores the previous mask exactly;
- a positive click's voxel is in the mask, a negative one's is not (the latest click on a voxel wins).

The model is the tiny test configuration with fixed random weights (fast; the properties do not depend
on what it learned). Bounded for CI: the default profile runs a fixed, derandomised set of examples in
well under a minute; ``HYPOTHESIS_PROFILE=explore`` runs many more, randomly.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from FastSAM3DLib import Session, build_model
from FastSAM3DLib.preprocess import image_affine, index_to_physical

settings.register_profile(
    "ci", max_examples=14, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.manual_seed(0)
MODEL = build_model("tiny")  # built once: hypothesis calls the test many times


def _rotation(angles, flips) -> np.ndarray:
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx @ np.diag(flips)


@st.composite
def geometries(draw):
    size = tuple(draw(st.integers(2, 36)) for _ in range(3))
    spacing = tuple(draw(st.sampled_from([0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5])) for _ in range(3))
    oblique = draw(st.booleans())
    angles = tuple(draw(st.floats(-np.pi, np.pi)) for _ in range(3)) if oblique else (0.0, 0.0, 0.0)
    flips = tuple(draw(st.sampled_from([1.0, -1.0])) for _ in range(3))
    origin = tuple(draw(st.floats(-300, 300)) for _ in range(3))
    seed = draw(st.integers(0, 1000))
    return size, spacing, _rotation(angles, flips), origin, seed


@st.composite
def prompt_sequences(draw):
    """Actions: ("point", fraction of the size per axis, positive), ("box", fractions, fractions), ("undo",)."""
    fraction = st.tuples(*[st.floats(0.0, 1.0)] * 3)
    action = st.one_of(
        st.tuples(st.just("point"), fraction, st.booleans()),
        st.tuples(st.just("box"), fraction, fraction),
        st.tuples(st.just("undo")),
    )
    first = draw(st.tuples(st.just("point"), fraction, st.just(True)))
    return [first] + draw(st.lists(action, min_size=0, max_size=4))


def _image(size, spacing, direction, origin, seed) -> sitk.Image:
    array = np.random.default_rng(seed).normal(100, 25, size[::-1]).astype(np.float32)
    array[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in size[::-1])] += 60  # something to find
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.flatten()))
    image.SetOrigin(origin)
    return image


def _same_grid(output: sitk.Image, image: sitk.Image) -> None:
    assert output.GetSize() == image.GetSize()
    assert output.GetSpacing() == image.GetSpacing()
    assert output.GetOrigin() == image.GetOrigin()
    assert output.GetDirection() == image.GetDirection()


def _outside_all_crops(session: Session, image: sitk.Image) -> np.ndarray:
    """(z, y, x) boolean: voxels whose centres lie outside every crop of object 0 (beyond rounding)."""
    size = image.GetSize()
    zs, ys, xs = np.indices(size[::-1])
    index = np.stack([xs, ys, zs], -1).reshape(-1, 3).astype(np.float64)
    matrix, origin = image_affine(image)
    physical = index @ matrix.T + origin
    outside = np.ones(len(index), dtype=bool)
    for crop in session._objects[0].crops:
        crop_index = crop.to_index(physical)
        inside = np.all((crop_index >= -0.5 - 1e-6) & (crop_index <= crop.size - 0.5 + 1e-6), axis=1)
        outside &= ~inside
    return outside.reshape(size[::-1])


@given(geometry=geometries(), actions=prompt_sequences())
def test_session_invariants_over_geometry_and_prompt_sequences(geometry, actions):
    image = _image(*geometry)
    size = np.asarray(image.GetSize())
    session = Session(MODEL, prefetch=False)
    session.set_image(image)
    history = []  # masks before each prompt still in force
    clicks = []  # (voxel index (x, y, z), positive) of the clicks still in force, oldest first
    mask = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    applied = mask.copy()  # a live view's copy, kept up to date by predict_changes alone
    for action in actions:
        if action[0] == "undo":
            undone = session.undo()
            assert undone == bool(history)
            if not undone:
                continue
            expected, clicks = history.pop()
            changed, delta = session.predict_changes()  # relative to the last prediction handed out
            applied[changed.slices()] = delta
            assert np.array_equal(applied, expected)
            mask_image = session.predict()
            assert np.array_equal(sitk.GetArrayFromImage(mask_image), expected)  # undo is exact
            mask = expected
            continue
        history.append((mask, list(clicks)))
        if action[0] == "point":
            voxel = tuple(int(round(f * (n - 1))) for f, n in zip(action[1], size))
            session.add_point(index_to_physical(image, voxel), positive=action[2])
            clicks.append((voxel, action[2]))
        else:
            a = np.asarray(action[1]) * (size - 1)
            b = np.asarray(action[2]) * (size - 1)
            corner, opposite = index_to_physical(image, a), index_to_physical(image, b)
            if np.any(np.abs(corner - opposite) < min(image.GetSpacing())):
                history.pop()  # a flat box is refused (tested elsewhere); nothing happened
                continue
            session.add_box(corner, opposite)

        changed, delta = session.predict_changes()  # the live view's way: only what changed
        applied[changed.slices()] = delta
        mask_image = session.predict()
        _same_grid(mask_image, image)
        mask = sitk.GetArrayFromImage(mask_image)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(applied, mask)

        region, local = session.predict_region()
        inside = np.zeros(mask.shape, dtype=bool)
        inside[region.slices()] = True
        assert not mask[~inside].any()  # the region holds every non-zero voxel
        assert np.array_equal(mask[region.slices()], local)
        assert not mask[_outside_all_crops(session, image)].any()  # nothing outside the crops

        latest = {}
        for voxel, positive in clicks:
            latest[voxel] = positive
        for voxel, positive in latest.items():
            assert mask[voxel[::-1]] == int(positive)  # click consistency

    probability = session.predict_proba()
    _same_grid(probability, image)
    values = sitk.GetArrayFromImage(probability)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0
    region, _ = session.predict_region()
    outside_region = np.ones(values.shape, dtype=bool)
    outside_region[region.slices()] = False
    assert not values[outside_region].any()
    session.close()


@given(geometry=geometries(), fraction=st.tuples(*[st.floats(0.0, 1.0)] * 3))
@settings(max_examples=6)
def test_uncertainty_maps_are_on_the_input_grid(geometry, fraction):
    image = _image(*geometry)
    size = np.asarray(image.GetSize())
    session = Session(MODEL, prefetch=False)
    session.set_image(image)
    session.add_point(index_to_physical(image, np.round(np.asarray(fraction) * (size - 1))))
    mean, spread = session.uncertainty(n=2, method="click-jitter")
    for output in (mean, spread):
        _same_grid(output, image)
        assert np.isfinite(sitk.GetArrayViewFromImage(output)).all()
    session.close()
