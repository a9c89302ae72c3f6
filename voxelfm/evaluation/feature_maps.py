"""Figures of dense probes: PCA maps of patch tokens, segmentation overlays, localisation.

Every panel is drawn in world millimetres (``imshow`` extents from spacing and origin), so
anisotropic voxels keep their true aspect and points in RAS mm are plotted as they are.
Canonical arrays are (X, Y, Z) pointing (R, A, S); slices follow the radiological
convention, labelled on every panel:

* axial (a Z slice), seen from the feet: patient Right on the viewer's left, Anterior up;
* coronal (a Y slice), seen from the front: Right on the left, Superior up;
* sagittal (an X slice), seen from the patient's left: Anterior on the left, Superior up.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (no global state, no
display backend); save them with ``figure.savefig``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DEFAULT_HU_WINDOW = (-400.0, 400.0)  # (low, high): a wide soft-tissue window

# view name -> (axis held fixed, horizontal axis, vertical axis, flip horizontal,
#               letters at (left, right, top, bottom))
_VIEWS: dict[str, tuple[int, int, int, bool, tuple[str, str, str, str]]] = {
    "axial": (2, 0, 1, True, ("R", "L", "A", "P")),
    "coronal": (1, 0, 2, True, ("R", "L", "S", "I")),
    "sagittal": (0, 1, 2, True, ("A", "P", "S", "I")),
}
VIEWS = tuple(_VIEWS)


def _as_triple(values: Sequence[float] | None, default: float) -> np.ndarray:
    if values is None:
        return np.full(3, default, dtype=float)
    array = np.asarray(values, dtype=float)
    if array.shape != (3,):
        raise ValueError(f"expected three numbers, got {values}")
    return array


def _check_volume(image_hu: np.ndarray) -> np.ndarray:
    image_hu = np.asarray(image_hu)
    if image_hu.ndim != 3 or min(image_hu.shape) < 1:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {image_hu.shape}")
    return image_hu


def _slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """(horizontal, vertical[, ...]) slice of an (X, Y, Z[, ...]) array for ``view``.

    Removing the fixed axis leaves the other two in (X, Y, Z) order, which is the
    (horizontal, vertical) order of every view.
    """
    return np.take(volume, index, axis=_VIEWS[view][0])


def _show(
    ax,
    plane: np.ndarray,
    view: str,
    spacing: np.ndarray,
    origin: np.ndarray,
    **imshow_kwargs,
) -> None:
    """Draw a (horizontal, vertical[, rgb]) plane in world mm with its orientation letters."""
    _, horizontal, vertical, flip, letters = _VIEWS[view]
    n_h, n_v = plane.shape[:2]
    extent = (
        origin[horizontal] - spacing[horizontal] / 2,
        origin[horizontal] + (n_h - 0.5) * spacing[horizontal],
        origin[vertical] - spacing[vertical] / 2,
        origin[vertical] + (n_v - 0.5) * spacing[vertical],
    )
    # imshow rows are the vertical axis: transpose (h, v) -> (v, h); origin="lower" puts the
    # first voxel at the bottom so superior / anterior are up.
    image = np.swapaxes(plane, 0, 1)
    ax.imshow(image, origin="lower", extent=extent, aspect="equal", **imshow_kwargs)
    if flip:
        ax.set_xlim(extent[1], extent[0])
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, letters[0], ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters[1], ha="right", va="center", **style)
    ax.text(0.5, 0.98, letters[2], ha="center", va="top", **style)
    ax.text(0.5, 0.02, letters[3], ha="center", va="bottom", **style)


def _hu_display(hu_window: tuple[float, float]) -> dict:
    return {"cmap": "gray", "vmin": float(hu_window[0]), "vmax": float(hu_window[1])}


def pca_rgb(tokens: np.ndarray, *, max_fit_tokens: int = 20000, seed: int = 0) -> np.ndarray:
    """(gx, gy, gz, D) tokens -> (gx, gy, gz, 3) first three principal components in [0, 1].

    PCA is fitted on the scan's own tokens (a random subset of ``max_fit_tokens`` at most);
    each component is scaled by its 1st-99th percentiles and clipped, so a few outlying
    tokens do not wash out the map. Fewer than three components (D < 3 or rank-deficient
    tokens) leave the missing channels at 0.5.
    """
    from sklearn.decomposition import PCA

    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.ndim != 4:
        raise ValueError(f"expected (gx, gy, gz, D) tokens, got shape {tokens.shape}")
    flat = tokens.reshape(-1, tokens.shape[-1])
    rng = np.random.default_rng(seed)
    fit_rows = flat if len(flat) <= max_fit_tokens else flat[rng.choice(len(flat), max_fit_tokens)]
    n_components = int(min(3, flat.shape[1], len(fit_rows)))
    rgb = np.full((len(flat), 3), 0.5)
    if n_components > 0 and np.ptp(fit_rows, axis=0).max() > 0:
        components = PCA(n_components=n_components, random_state=seed).fit(fit_rows).transform(flat)
        low, high = np.percentile(components, [1, 99], axis=0)
        scale = np.where(high > low, high - low, 1.0)
        rgb[:, :n_components] = np.clip((components - low) / scale, 0.0, 1.0)
    return rgb.reshape(*tokens.shape[:3], 3)


def _token_index(n_voxels: int, n_tokens: int, patch_size: int) -> np.ndarray:
    """Token index of every voxel along one axis (token t covers [t*p, (t+1)*p))."""
    return np.minimum(np.arange(n_voxels) // patch_size, n_tokens - 1)


def _infer_patch_size(volume_shape: Sequence[int], grid_shape: Sequence[int]) -> int:
    # The extractor's grid is ceil(n / p) tokens per axis; the largest n / g rounded up is p
    # unless every axis is tiny, good enough for a picture.
    return max(1, max(-(-int(n) // int(g)) for n, g in zip(volume_shape, grid_shape)))


def pca_feature_map_figure(
    image_hu: np.ndarray,
    spacing: Sequence[float],
    tokens: np.ndarray,
    *,
    patch_size: int | None = None,
    origin: Sequence[float] | None = None,
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
    title: str | None = None,
) -> Figure:
    """The image and the first three principal components of its patch tokens as RGB.

    One row per view (axial, coronal, sagittal) through the volume centre; left the image
    in ``hu_window``, right the PCA colours (token blocks upsampled to the voxels they
    cover, so the map lies exactly over the anatomy it came from).

    Args:
        image_hu: (X, Y, Z) HU on the canonical grid the tokens came from.
        spacing: (3,) mm; origin: (3,) RAS mm of voxel 0 (default 0; only labels move).
        tokens: (gx, gy, gz, D) patch tokens; token (i, j, k) covers voxels
            [i*p, (i+1)*p) x ... with p = ``patch_size`` (inferred from the shapes if None).
    """
    image_hu = _check_volume(image_hu)
    tokens = np.asarray(tokens)
    if tokens.ndim != 4:
        raise ValueError(f"expected (gx, gy, gz, D) tokens, got shape {tokens.shape}")
    spacing_mm, origin_mm = _as_triple(spacing, 1.0), _as_triple(origin, 0.0)
    p = patch_size or _infer_patch_size(image_hu.shape, tokens.shape[:3])
    rgb_tokens = pca_rgb(tokens)
    # (X, Y, Z, 3): each voxel takes the colour of the token covering it.
    index = np.ix_(
        *(_token_index(n, g, p) for n, g in zip(image_hu.shape, tokens.shape[:3])),
    )
    rgb_voxels = rgb_tokens[index]
    centre = [n // 2 for n in image_hu.shape]

    figure = Figure(figsize=(6.4, 9.0), layout="constrained")
    axes = figure.subplots(len(VIEWS), 2, squeeze=False)
    for row, view in enumerate(VIEWS):
        fixed = _VIEWS[view][0]
        plane = _slice(image_hu, view, centre[fixed])
        _show(axes[row, 0], plane, view, spacing_mm, origin_mm, **_hu_display(hu_window))
        _show(axes[row, 1], _slice(rgb_voxels, view, centre[fixed]), view, spacing_mm, origin_mm)
        axes[row, 0].set_ylabel(view)
    axes[0, 0].set_title("CT")
    axes[0, 1].set_title("patch tokens: PCA 1-3 as RGB")
    if title:
        figure.suptitle(title)
    return figure


# Label colours, in the order classes receive them. Over CT the overlay's lightness follows
# the tissue underneath, so only hue tells classes apart: the first eight differ in CIELAB hue
# by at least 35 degrees (tab10's orange and brown, 22 degrees apart, read as one colour over
# a lung) and neighbours in the list lie far apart. Further classes get a second tier.
LABEL_PALETTE = (
    "#e6194b",  # red
    "#00ffff",  # cyan
    "#ffff00",  # yellow
    "#0080ff",  # blue
    "#3cb44b",  # green
    "#911eb4",  # purple
    "#ff7f00",  # orange
    "#00bfff",  # sky blue
    "#f032e6",  # magenta
    "#bfef45",  # lime
    "#469990",  # teal
    "#fabed4",  # pink
    "#9a6324",  # brown
    "#dcbeff",  # lavender
    "#800000",  # maroon
    "#aaffc3",  # mint
)
_LABEL_ALPHA = 0.6


def _label_colours(n_classes: int, classes: Sequence[int] | None = None) -> ListedColormap:
    """Colour map over values 0..n_classes: 0 transparent, the i-th of ``classes`` (default
    1..n_classes) gets LABEL_PALETTE[i], so named classes take the most distinct colours."""
    from matplotlib.colors import to_rgb

    order = list(classes) if classes is not None else list(range(1, n_classes + 1))
    order += [v for v in range(1, n_classes + 1) if v not in order]
    colours = [(0.0, 0.0, 0.0, 0.0)] * (n_classes + 1)
    for rank, value in enumerate(order):
        colours[value] = (*to_rgb(LABEL_PALETTE[rank % len(LABEL_PALETTE)]), _LABEL_ALPHA)
    return ListedColormap(colours)


def segmentation_overlay_figure(
    image_hu: np.ndarray,
    spacing: Sequence[float],
    truth: np.ndarray,
    prediction: np.ndarray,
    class_names: Mapping[int, str] | Sequence[str],
    *,
    origin: Sequence[float] | None = None,
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
    title: str | None = None,
) -> Figure:
    """Truth (left) and prediction (right) over the image; one row per view.

    Slices go through the centre of the true foreground (the volume centre when empty).

    Args:
        truth, prediction: (X, Y, Z) class indices, 0 = background, 1..C the classes.
        class_names: class index -> name (a mapping, or a sequence for indices 1..C).
    """
    image_hu = _check_volume(image_hu)
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != image_hu.shape or prediction.shape != image_hu.shape:
        raise ValueError(
            f"truth {truth.shape} and prediction {prediction.shape} must match the image "
            f"{image_hu.shape}"
        )
    names = (
        {int(k): str(v) for k, v in class_names.items()}
        if isinstance(class_names, Mapping)
        else {i + 1: str(name) for i, name in enumerate(class_names)}
    )
    n_classes = max([*names, int(truth.max(initial=0)), int(prediction.max(initial=0))])
    colours = _label_colours(n_classes, sorted(v for v in names if v > 0))
    spacing_mm, origin_mm = _as_triple(spacing, 1.0), _as_triple(origin, 0.0)
    foreground = np.argwhere(truth > 0)
    centre = (
        np.rint(foreground.mean(0)).astype(int)
        if len(foreground)
        else np.array([n // 2 for n in image_hu.shape])
    )

    figure = Figure(figsize=(6.4, 9.0), layout="constrained")
    axes = figure.subplots(len(VIEWS), 2, squeeze=False)
    for row, view in enumerate(VIEWS):
        fixed = _VIEWS[view][0]
        plane = _slice(image_hu, view, centre[fixed])
        for column, labels in enumerate((truth, prediction)):
            ax = axes[row, column]
            _show(ax, plane, view, spacing_mm, origin_mm, **_hu_display(hu_window))
            _show(
                ax,
                _slice(labels, view, centre[fixed]),
                view,
                spacing_mm,
                origin_mm,
                cmap=colours,
                vmin=-0.5,
                vmax=n_classes + 0.5,
                interpolation="nearest",
            )
        axes[row, 0].set_ylabel(view)
    axes[0, 0].set_title("truth")
    axes[0, 1].set_title("prediction")
    present = sorted(set(np.unique(truth).tolist()) | set(np.unique(prediction).tolist()) - {0})
    handles = [
        Patch(color=colours(value)[:3], label=names.get(value, str(value)))
        for value in present
        if value > 0
    ]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7)
    if title:
        figure.suptitle(title)
    return figure


def localisation_figure(
    image_hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    true_xyz_mm: Sequence[float],
    predicted_xyz_mm: Sequence[float] | None,
    *,
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
    title: str | None = None,
) -> Figure:
    """Axial, coronal and sagittal slices through the true point (one row), with markers.

    The true point is a green cross; the prediction a red circle at its in-plane position
    (its distance from the slice is given in the panel title).

    Args:
        image_hu: (X, Y, Z) HU on the canonical grid; spacing (3,) mm; origin (3,) RAS mm.
        true_xyz_mm, predicted_xyz_mm: RAS mm positions (prediction may be None).
    """
    image_hu = _check_volume(image_hu)
    spacing_mm, origin_mm = _as_triple(spacing, 1.0), _as_triple(origin, 0.0)
    truth = np.asarray(true_xyz_mm, dtype=float)
    predicted = None if predicted_xyz_mm is None else np.asarray(predicted_xyz_mm, dtype=float)
    voxel = np.rint((truth - origin_mm) / spacing_mm).astype(int)
    voxel = np.clip(voxel, 0, np.asarray(image_hu.shape) - 1)

    figure = Figure(figsize=(10.0, 3.8), layout="constrained")
    axes = figure.subplots(1, len(VIEWS), squeeze=False)[0]
    for ax, view in zip(axes, VIEWS):
        fixed, horizontal, vertical, _, _ = _VIEWS[view]
        plane = _slice(image_hu, view, voxel[fixed])
        _show(ax, plane, view, spacing_mm, origin_mm, **_hu_display(hu_window))
        ax.plot(truth[horizontal], truth[vertical], "+", color="lime", ms=12, mew=2)
        label = view
        if predicted is not None:
            ax.plot(
                predicted[horizontal], predicted[vertical], "o", mfc="none", mec="red", ms=10, mew=2
            )
            label += f" (prediction {predicted[fixed] - truth[fixed]:+.0f} mm off-plane)"
        ax.set_title(label, fontsize=8)
    if title:
        figure.suptitle(title)
    return figure
