"""Figures of the dense probes: axes count, PCA colours, orientation and aspect."""

from __future__ import annotations

import numpy as np
import pytest

from voxelfm.evaluation.feature_maps import (
    localisation_figure,
    pca_feature_map_figure,
    pca_rgb,
    segmentation_overlay_figure,
)

SPACING = (1.0, 1.5, 3.0)  # anisotropic on purpose
ORIGIN = (-20.0, 10.0, 40.0)


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (24, 20, 10)).astype(np.int16)
    image[18:22, 8:12, 4:6] = 900  # bright block toward patient Right (high x)
    return image


def _image_extent(ax):
    return ax.get_images()[0].get_extent()


def test_pca_rgb_follows_the_main_direction_of_variation():
    rng = np.random.default_rng(1)
    position = np.linspace(-1, 1, 6)[:, None, None, None] * np.ones((6, 5, 4, 1))
    direction = rng.normal(size=12)
    tokens = position * direction * 10 + rng.normal(0, 0.1, (6, 5, 4, 12))
    rgb = pca_rgb(tokens)
    assert rgb.shape == (6, 5, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].mean(axis=(1, 2))
    assert abs(np.corrcoef(first, np.arange(6))[0, 1]) > 0.99
    # Constant tokens have no components: mid grey, no error.
    np.testing.assert_array_equal(pca_rgb(np.ones((2, 2, 2, 4))), 0.5)


def test_pca_figure_axes_and_aspect(volume, tmp_path):
    tokens = np.random.default_rng(2).normal(size=(6, 5, 3, 16))
    figure = pca_feature_map_figure(volume, SPACING, tokens, patch_size=4, origin=ORIGIN)
    axes = figure.get_axes()
    assert len(axes) == 6  # (axial, coronal, sagittal) x (CT, PCA)
    axial_ct, axial_pca = axes[0], axes[1]
    # Extents in world mm: x spans 24 voxels x 1 mm, y 20 x 1.5 mm.
    left, right, bottom, top = _image_extent(axial_ct)
    assert right - left == pytest.approx(24 * 1.0) and top - bottom == pytest.approx(20 * 1.5)
    assert _image_extent(axial_pca) == pytest.approx(_image_extent(axial_ct))
    # The PCA panel is the token grid upsampled to the slice's voxels.
    assert axial_pca.get_images()[0].get_array().shape == (20, 24, 3)
    sagittal = axes[4]
    left, right, bottom, top = _image_extent(sagittal)
    assert top - bottom == pytest.approx(10 * 3.0)
    figure.savefig(tmp_path / "pca.png")
    assert (tmp_path / "pca.png").stat().st_size > 0


def test_radiological_orientation(volume):
    figure = pca_feature_map_figure(volume, SPACING, np.ones((6, 5, 3, 4)), patch_size=4)
    axial = figure.get_axes()[0]
    # Patient Right (high x) on the viewer's left: the x axis runs from high to low.
    xlim = axial.get_xlim()
    assert xlim[0] > xlim[1]
    letters = {t.get_text() for t in axial.texts}
    assert letters == {"R", "L", "A", "P"}
    coronal, sagittal = figure.get_axes()[2], figure.get_axes()[4]
    assert {t.get_text() for t in coronal.texts} == {"R", "L", "S", "I"}
    assert {t.get_text() for t in sagittal.texts} == {"A", "P", "S", "I"}
    # Superior up: the image origin is at the bottom.
    assert coronal.get_images()[0].origin == "lower"


def test_segmentation_overlay_axes(volume, tmp_path):
    truth = np.zeros(volume.shape, dtype=np.uint8)
    truth[18:22, 8:12, 4:6] = 1
    truth[2:6, 2:6, 2:4] = 2
    prediction = np.roll(truth, 1, axis=0)
    figure = segmentation_overlay_figure(
        volume, SPACING, truth, prediction, {1: "tumour", 2: "organ"}, origin=ORIGIN
    )
    assert len(figure.get_axes()) == 6
    assert len(figure.get_axes()[0].get_images()) == 2  # CT + label overlay
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["tumour", "organ"]
    figure.savefig(tmp_path / "seg.png")
    with pytest.raises(ValueError, match="must match"):
        segmentation_overlay_figure(volume, SPACING, truth[:-1], prediction, ["a", "b"])


def test_localisation_figure_marks_points_in_world_mm(volume, tmp_path):
    true_xyz = np.asarray(ORIGIN) + np.array([20, 10, 5]) * np.asarray(SPACING)
    predicted = true_xyz + [4.0, -3.0, 6.0]
    figure = localisation_figure(volume, SPACING, ORIGIN, true_xyz, predicted)
    axes = figure.get_axes()
    assert len(axes) == 3
    axial = axes[0]
    truth_marker, predicted_marker = axial.get_lines()
    assert truth_marker.get_xdata()[0] == pytest.approx(true_xyz[0])
    assert truth_marker.get_ydata()[0] == pytest.approx(true_xyz[1])
    assert predicted_marker.get_xdata()[0] == pytest.approx(predicted[0])
    assert "+6 mm off-plane" in axial.get_title()
    sagittal = axes[2]
    assert sagittal.get_lines()[0].get_xdata()[0] == pytest.approx(true_xyz[1])
    figure.savefig(tmp_path / "loc.png")
    assert len(localisation_figure(volume, SPACING, ORIGIN, true_xyz, None).get_axes()) == 3


def _lab_hue_degrees(hex_colour: str) -> float:
    """CIELAB hue angle of an sRGB colour (D65)."""
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(hex_colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = (
        np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
        @ linear
        / np.array([0.9505, 1.0, 1.089])
    )
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    a, b = 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return float(np.degrees(np.arctan2(b, a)) % 360)


def _smallest_hue_gap(colours) -> float:
    hues = [_lab_hue_degrees(c) for c in colours]
    gaps = [abs(h - g) for i, h in enumerate(hues) for g in hues[i + 1 :]]
    return min(min(gap, 360 - gap) for gap in gaps)


def test_label_palette_tells_eight_classes_apart_by_hue():
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from voxelfm.evaluation.feature_maps import LABEL_PALETTE, _label_colours

    # tab10's orange and brown (lung_right and kidney_right in the demo) fail this test
    tab10 = colormaps["tab10"]
    assert _smallest_hue_gap([to_hex(tab10(1)), to_hex(tab10(5))]) < 30
    assert _smallest_hue_gap(LABEL_PALETTE[:8]) >= 30
    # The demo's classes 1-6, 9, 10 take the first eight colours, in order.
    colours = _label_colours(10, [1, 2, 3, 4, 5, 6, 9, 10])
    used = [to_hex(colours(value)[:3]) for value in (1, 2, 3, 4, 5, 6, 9, 10)]
    assert used == [c.lower() for c in LABEL_PALETTE[:8]]
    assert colours(0)[3] == 0  # background stays transparent
