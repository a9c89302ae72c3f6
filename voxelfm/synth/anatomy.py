"""One synthetic patient: torso anatomy and lesions, defined once in patient millimetres.

Nothing here knows about scans. A ``Phantom`` is a closed-form description (shapes, HU,
texture) that ``voxelfm.synth.render`` samples on any grid, so every scan of a patient shows
the same anatomy by construction.

Dimensions are a reference adult scaled per patient: the trunk by (sx, sy, sz), organs by
their own factors (liver 0.8-1.25 in each axis, i.e. about 0.5-2x the reference 1.4 l), so
organ size varies largely independently of body habitus and is visible only in the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.spatial.transform import Rotation

from voxelfm.synth.raster import Structure, rasterise
from voxelfm.synth.shapes import Ellipsoid, EllipticCylinder, RibCage, Shape
from voxelfm.synth.texture import RandomField, random_field

# Label map values; written to label_names.json. 0 is everything unlabelled (air, fat, muscle).
LABELS: dict[str, int] = {
    "lung_left": 1,
    "lung_right": 2,
    "liver": 3,
    "spleen": 4,
    "kidney_left": 5,
    "kidney_right": 6,
    "spine": 7,
    "ribs": 8,
    "aorta": 9,
    "heart": 10,
    "lung_nodule": 11,
    "liver_lesion": 12,
}

LesionKind = Literal["lung_nodule", "liver_lesion"]

NODULE_DIAMETER_MM = (4.0, 25.0)
LIVER_LESION_DIAMETER_MM = (8.0, 40.0)
# Repeat scans may show lesions up to this much larger; placement leaves room for it.
MAX_LESION_GROWTH = 1.15
# Lesions keep this far apart so that, even at 5 mm voxels, two never merge into one blob.
_LESION_GAP_MM = 12.0


@dataclass(frozen=True, eq=False)
class Lesion:
    """A focal lesion at baseline size. ``location`` is a lobe or a Couinaud segment."""

    kind: LesionKind
    shape: Ellipsoid
    hu: float
    location: str

    def diameter_mm(self, growth: float = 1.0) -> float:
        """Longest diameter, as a radiologist would measure it."""
        return float(2.0 * self.shape.semi_axes.max() * growth)

    def volume_ml(self, growth: float = 1.0) -> float:
        return self.shape.volume_mm3 * growth**3 / 1000.0

    def structure(self, growth: float = 1.0) -> Structure:
        return Structure(LABELS[self.kind], self.shape.scaled(growth), self.hu)


@dataclass(frozen=True, eq=False)
class Phantom:
    """Everything about a patient that every scan of that patient shares."""

    patient_id: str
    anatomy: tuple[Structure, ...]  # painted in order, lesions excluded
    body_outline: Shape  # skin surface
    body_interior: Shape  # inside the subcutaneous fat; organs are clipped to it
    lesions: tuple[Lesion, ...]
    texture: RandomField
    liver_hu: float  # parenchymal attenuation; low values mean steatosis
    traits: dict[str, float]  # the per-patient draws, for patients.csv

    def structures(self, growth: float = 1.0) -> list[Structure]:
        """Anatomy then lesions (grown by ``growth``), in painting order."""
        return [*self.anatomy, *(lesion.structure(growth) for lesion in self.lesions)]

    def lesion_volume_ml(self, growth: float = 1.0) -> float:
        return sum(lesion.volume_ml(growth) for lesion in self.lesions)

    def liver_and_lesion_bounds(self, growth: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame box around the liver and all lesions: what every scan must cover."""
        shapes = [s.shape for s in self.anatomy if s.label == LABELS["liver"]]
        shapes += [lesion.shape.scaled(growth) for lesion in self.lesions]
        lows, highs = zip(*(shape.bounds() for shape in shapes))
        return np.min(lows, axis=0), np.max(highs, axis=0)

    def labels_at(self, shape: tuple[int, int, int], index_to_patient: np.ndarray) -> np.ndarray:
        """Label map (I, J, K) of the anatomy without lesions on a grid (placement checks)."""
        instances, _ = rasterise(
            self.anatomy,
            shape,
            index_to_patient,
            body_interior=self.body_interior,
            texture=self.texture,
        )
        lut = np.array([s.label for s in self.anatomy] + [0])  # instance -1 -> last entry, 0
        return lut[instances]


def make_phantom(
    rng: np.random.Generator,
    patient_id: str,
    *,
    nodule_probability: float = 0.4,
    liver_lesion_probability: float = 0.45,
) -> Phantom:
    """Draw one patient: habitus, organ sizes, attenuation, texture and lesions.

    Each lesion kind is present with the given probability, then 1-3 lesions of that kind
    are placed wholly inside their organ (room left for growth on repeat scans).
    """
    traits = {
        "body_scale_x": rng.uniform(0.85, 1.15),
        "body_scale_y": rng.uniform(0.9, 1.2),
        "body_scale_z": rng.uniform(0.92, 1.08),
        "fat_mm": rng.uniform(8.0, 35.0),
        "lung_scale": rng.uniform(0.92, 1.08),
        "liver_scale": rng.uniform(0.8, 1.25),
        "spleen_scale": rng.uniform(0.8, 1.4),
        "kidney_scale": rng.uniform(0.9, 1.1),
        "liver_hu": rng.uniform(25.0, 70.0),
    }
    outline, interior, anatomy = _anatomy(rng, traits)
    phantom = Phantom(
        patient_id=patient_id,
        anatomy=tuple(anatomy),
        body_outline=outline,
        body_interior=interior,
        lesions=(),
        texture=random_field(rng),
        liver_hu=traits["liver_hu"],
        traits=traits,
    )
    lesions: list[Lesion] = []
    if rng.random() < nodule_probability:
        lesions += _place_lesions(rng, phantom, "lung_nodule", int(rng.integers(1, 4)), lesions)
    if rng.random() < liver_lesion_probability:
        lesions += _place_lesions(rng, phantom, "liver_lesion", int(rng.integers(1, 4)), lesions)
    return dataclasses.replace(phantom, lesions=tuple(lesions))


def _anatomy(
    rng: np.random.Generator, traits: dict[str, float]
) -> tuple[Shape, Shape, list[Structure]]:
    """Body outline, body interior and the ordered structures of a scaled reference adult."""
    sx, sy, sz = traits["body_scale_x"], traits["body_scale_y"], traits["body_scale_z"]
    # Organs grow less than the trunk with habitus, so organ size stays mostly its own trait.
    habitus = np.sqrt((sx + sy) / 2.0)

    def at(x: float, y: float, z: float) -> np.ndarray:
        return np.array([x * sx, y * sy, z * sz])

    def sized(a: float, b: float, c: float, organ_scale: float = 1.0) -> np.ndarray:
        return np.array([a, b, c]) * organ_scale * habitus

    def turned(**degrees: float) -> np.ndarray:
        axes = "".join(degrees)
        return Rotation.from_euler(axes, list(degrees.values()), degrees=True).as_matrix()

    lung, liver = traits["lung_scale"], traits["liver_scale"]
    spleen, kidney = traits["spleen_scale"], traits["kidney_scale"]
    # The trunk is a long elliptic cylinder: muscle inside, a fat layer around it.
    interior = EllipticCylinder(np.zeros(3), np.array([155.0 * sx, 108.0 * sy, 600.0]))
    fat = np.array([traits["fat_mm"], traits["fat_mm"], 0.0])
    outline = EllipticCylinder(np.zeros(3), interior.semi_axes + fat)
    lung_hu = rng.uniform(-870.0, -830.0)
    liver_hu = traits["liver_hu"]
    blood = {"hu": 40.0, "contrast_hu": 180.0}  # unenhanced blood, arterial-phase enhancement
    aorta = EllipticCylinder(at(-22, -30, 0), np.array([13.0, 13.0, 600.0]) * habitus)
    anatomy = [
        Structure(0, outline, rng.uniform(-110.0, -90.0), clip_to_body=False),
        Structure(0, interior, rng.uniform(35.0, 45.0), clip_to_body=False),
        Structure(
            LABELS["lung_right"],
            Ellipsoid(at(72, 5, 95), sized(62, 80, 120, lung)),
            lung_hu,
            texture_hu=45.0,
        ),
        Structure(
            LABELS["lung_left"],
            Ellipsoid(at(-72, 5, 100), sized(58, 78, 115, lung)),
            lung_hu,
            texture_hu=45.0,
        ),
        # Right lobe first: lesion placement and segment naming rely on that order.
        Structure(
            LABELS["liver"],
            Ellipsoid(at(60, 5, -55), sized(62, 70, 66, liver)),
            liver_hu,
            texture_hu=6.0,
        ),
        Structure(
            LABELS["liver"],
            Ellipsoid(at(-15, 35, -35), sized(55, 40, 32, liver), turned(z=-15)),
            liver_hu,
            texture_hu=6.0,
        ),
        Structure(
            LABELS["spleen"],
            Ellipsoid(at(-85, -35, -45), sized(28, 50, 55, spleen), turned(z=30)),
            rng.uniform(45.0, 55.0),
            texture_hu=5.0,
        ),
        Structure(
            LABELS["kidney_right"],
            Ellipsoid(at(60, -55, -135), sized(28, 25, 55, kidney), turned(y=-10)),
            hu=30.0,
            contrast_hu=120.0,
        ),
        Structure(
            LABELS["kidney_left"],
            Ellipsoid(at(-60, -55, -120), sized(28, 25, 55, kidney), turned(y=10)),
            hu=30.0,
            contrast_hu=120.0,
        ),
        Structure(
            LABELS["heart"], Ellipsoid(at(-20, 35, 60), sized(55, 45, 50), turned(z=-30)), **blood
        ),
        Structure(LABELS["aorta"], aorta, **blood),
    ]
    # Vertebrae: cortical rim around cancellous core, with a posterior element behind each.
    vertebra_pitch = 27.0 * sz
    for z in np.arange(-15, 16) * vertebra_pitch:
        bone = {"hu": 700.0, "core_hu": 250.0, "core_fraction": 0.7}
        vertebral_body = EllipticCylinder(at(0, -65, 0) + [0, 0, z], sized(22, 18, 11))
        posterior_element = Ellipsoid(at(0, -93, 0) + [0, 0, z], sized(10, 12, 9))
        anatomy.append(Structure(LABELS["spine"], vertebral_body, **bone))
        anatomy.append(Structure(LABELS["spine"], posterior_element, **bone))
    ribs = RibCage(
        ring_semi_axes=(interior.semi_axes[0] * 0.95, interior.semi_axes[1] * 0.95),
        z_lowest=-70.0 * sz,
        pitch=24.0 * sz,
        count=13,
    )
    anatomy.append(Structure(LABELS["ribs"], ribs, hu=650.0, core_hu=300.0, core_fraction=0.5))
    return outline, interior, anatomy


def _place_lesions(
    rng: np.random.Generator,
    phantom: Phantom,
    kind: LesionKind,
    count: int,
    existing: list[Lesion],
    attempts: int = 200,
) -> list[Lesion]:
    """Up to ``count`` lesions wholly inside their organ and clear of ``existing`` ones."""
    placed: list[Lesion] = []
    for _ in range(count):
        for _ in range(attempts):
            lesion, organ_label = _candidate_lesion(rng, phantom, kind)
            radius = lesion.diameter_mm(MAX_LESION_GROWTH) / 2.0
            clear = all(
                np.linalg.norm(lesion.shape.centre - other.shape.centre)
                > radius + other.diameter_mm(MAX_LESION_GROWTH) / 2.0 + _LESION_GAP_MM
                for other in [*existing, *placed]
            )
            if clear and _inside_organ(phantom, lesion.shape.centre, radius, organ_label):
                placed.append(lesion)
                break
    return placed


def _candidate_lesion(
    rng: np.random.Generator, phantom: Phantom, kind: LesionKind
) -> tuple[Lesion, int]:
    """A lesion of random size and position in its organ, and the label of that organ."""
    if kind == "lung_nodule":
        organ_label = LABELS["lung_right"] if rng.random() < 0.55 else LABELS["lung_left"]
        diameter = rng.uniform(*NODULE_DIAMETER_MM)
        hu = rng.uniform(0.0, 50.0)  # solid nodule
    else:
        organ_label = LABELS["liver"]
        diameter = rng.uniform(*LIVER_LESION_DIAMETER_MM)
        # Hypodense (cyst / metastasis) and always at least 20 HU below the parenchyma, so
        # the lesion stays visible even in a steatotic liver.
        hu = min(rng.uniform(5.0, 30.0), phantom.liver_hu - 20.0)
    organs = [s.shape for s in phantom.anatomy if s.label == organ_label]
    # The liver's right lobe is the larger one, so it gets most lesions, as in reality.
    organ = organs[0] if len(organs) == 1 or rng.random() < 0.8 else organs[1]
    centre = _random_point_in(rng, organ)
    semi_axes = diameter / 2.0 * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)])
    shape = Ellipsoid(centre, semi_axes, Rotation.random(random_state=rng).as_matrix())
    if kind == "lung_nodule":
        location = _lung_lobe(centre, organ, organ_label)
    else:
        location = _liver_segment(centre, phantom)
    return Lesion(kind=kind, shape=shape, hu=float(hu), location=location), organ_label


def _random_point_in(rng: np.random.Generator, ellipsoid: Ellipsoid) -> np.ndarray:
    direction = rng.normal(size=3)
    unit_ball_point = direction / np.linalg.norm(direction) * rng.random() ** (1.0 / 3.0)
    return ellipsoid.centre + ellipsoid.rotation @ (unit_ball_point * ellipsoid.semi_axes)


def _inside_organ(phantom: Phantom, centre: np.ndarray, radius: float, organ_label: int) -> bool:
    """Whether a ball of ``radius`` mm (+2 mm) at ``centre`` lies in the organ (9^3 probe grid)."""
    steps = 9
    spacing = 2.0 * (radius + 2.0) / (steps - 1)  # 2 mm margin
    index_to_patient = np.diag([spacing, spacing, spacing, 1.0])
    index_to_patient[:3, 3] = centre - spacing * (steps - 1) / 2.0
    labels = phantom.labels_at((steps, steps, steps), index_to_patient)
    offsets = (np.moveaxis(np.indices((steps,) * 3), 0, -1) - (steps - 1) / 2.0) * spacing
    in_ball = np.linalg.norm(offsets, axis=-1) <= radius + 2.0  # (steps, steps, steps)
    return bool((labels[in_ball] == organ_label).all())


def _lung_lobe(centre: np.ndarray, lung: Ellipsoid, organ_label: int) -> str:
    """Approximate lobe from height in the lung (and, on the right, front/back for the middle lobe)."""
    height = (centre[2] - (lung.centre[2] - lung.semi_axes[2])) / (2.0 * lung.semi_axes[2])
    if organ_label == LABELS["lung_left"]:
        return "left upper lobe" if height >= 0.45 else "left lower lobe"
    if height >= 0.6:
        return "right upper lobe"
    if height >= 0.35 and centre[1] > lung.centre[1]:
        return "right middle lobe"
    return "right lower lobe"


def _liver_segment(centre: np.ndarray, phantom: Phantom) -> str:
    """Approximate Couinaud segment from the position relative to the right lobe's centre."""
    right_lobe = next(s.shape for s in phantom.anatomy if s.label == LABELS["liver"])
    sx = phantom.traits["body_scale_x"]
    upper = centre[2] > right_lobe.centre[2]
    if centre[0] < -35.0 * sx:  # left lateral section
        return "segment II" if upper else "segment III"
    if centre[0] < 15.0 * sx:  # between the falciform ligament and Cantlie's line
        return "segment IVa" if upper else "segment IVb"
    if centre[1] > right_lobe.centre[1]:
        return "segment VIII" if upper else "segment V"
    return "segment VII" if upper else "segment VI"
