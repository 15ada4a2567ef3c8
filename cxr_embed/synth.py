"""Synthetic chest radiographs with visible findings: the offline demo dataset and the test data.

Why synthetic: tests and the demo run without network and cannot ship real radiographs, yet a
classifier must be able to learn Normal/Abnormal *from the pixels*. Each image is a PA/AP-like chest
film drawn from a per-patient anatomy (body habitus, lung fields tapering to the apices, diaphragm
domes, heart, mediastinum and spine, posterior ribs, clavicles, vascular markings) with per-image
exposure, gamma and quantum noise, so global brightness says little about the label. Abnormal images
carry 1-3 findings drawn with ChestX-ray14-like frequencies and rendered where radiologists see them
(e.g. effusion as a meniscus in the costophrenic angle, pneumothorax as a lucent rim without lung
markings and a pleural line, cardiomegaly as a cardiothoracic ratio > 0.5).

Cohort: patients with 1-5 follow-ups (numbered from 0 as in ChestX-ray14), exactly half of the
images abnormal, the official-style patient-wise split (about a quarter of patients in "test").
Everything is deterministic per ``seed``. Rendering is vectorised: anatomy and findings are drawn on a
<= 320 px grid (all smooth structures), upsampled, then full-resolution noise is added.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import ConfigError
from cxr_embed.records import FINDINGS

LAYOUTS = ("chestxray14", "folder", "dicom")
WORK_SIZE = 320
NOISE_PAD = 97
# ChestX-ray14 label counts (NIH 2017), used as relative frequencies of the synthetic findings.
FINDING_WEIGHTS = {
    "infiltration": 19894, "effusion": 13317, "atelectasis": 11559, "nodule": 6331, "mass": 5782,
    "pneumothorax": 5302, "consolidation": 4667, "pleural_thickening": 3385, "cardiomegaly": 2776,
    "emphysema": 2516, "edema": 2303, "fibrosis": 1686, "pneumonia": 1431, "hernia": 227,
}  # fmt: skip
FOLLOWUP_COUNTS = (1, 2, 3, 4, 5)
FOLLOWUP_PROBS = (0.35, 0.25, 0.2, 0.12, 0.08)
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class SynthCase:
    """One synthetic image: who, when, what it shows."""

    index: int
    image_id: str
    patient: int
    study: int
    findings: tuple[int, ...]
    sex: str
    age: int
    view: str
    split: str

    @property
    def label(self) -> int:
        return int(any(self.findings))


@dataclass(frozen=True)
class SynthResult:
    """What ``generate`` wrote."""

    out: str
    layout: str
    size: int
    seed: int
    n_images: int
    n_patients: int
    n_abnormal: int
    n_test: int
    finding_counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- cohort


def plan_cases(n: int, seed: int = 0) -> list[SynthCase]:
    """Patients, follow-ups, labels, findings, demographics and the patient-wise split for n images."""
    if n < 1:
        raise ConfigError("--n must be at least 1.")
    rng = np.random.default_rng([seed, 0])
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice(FOLLOWUP_COUNTS, p=FOLLOWUP_PROBS)))
    sizes[-1] -= sum(sizes) - n
    labels = np.zeros(n, dtype=int)
    labels[: (n + 1) // 2] = 1
    rng.shuffle(labels)
    weights = np.array([FINDING_WEIGHTS[f] for f in FINDINGS], dtype=float)
    weights /= weights.sum()
    patients = np.arange(len(sizes))
    test_patients = set(rng.permutation(patients)[: int(round(len(sizes) * TEST_FRACTION))].tolist())

    cases: list[SynthCase] = []
    for patient, count in enumerate(sizes):
        disease = rng.choice(len(FINDINGS), size=3, replace=False, p=weights)
        sex = "M" if rng.random() < 0.56 else "F"
        age = int(rng.integers(18, 86))
        for study in range(count):
            i = len(cases)
            flags = [0] * len(FINDINGS)
            if labels[i]:
                for f in disease[: int(rng.integers(1, 4))]:
                    flags[int(f)] = 1
            cases.append(
                SynthCase(
                    index=i,
                    image_id=f"{patient + 1:08d}_{study:03d}.png",
                    patient=patient + 1,
                    study=study,
                    findings=tuple(flags),
                    sex=sex,
                    age=min(age + study // 2, 95),
                    view="AP" if rng.random() < 0.3 else "PA",
                    split="test" if patient in test_patients else "train",
                )
            )
    return cases


# --------------------------------------------------------------------------- drawing helpers


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (std ~1): a cells x cells random grid bicubically upsampled."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up)


def _blob(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float
) -> np.ndarray:
    """Soft ellipse mask: 1 inside, 0 outside, ``edge`` = softness in radius units."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _sigmoid((1.0 - d) / edge)


@dataclass
class Anatomy:
    """Per-patient geometry in normalised coordinates (x, y in [-1, 1], y down, image right = x > 0)."""

    body_w: float
    lung_x: float
    lung_w: float
    lung_top: float
    dome_y: float
    heart_w: float
    heart_h: float
    heart_x: float
    rib_phase: float
    rib_count: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        return cls(
            body_w=rng.uniform(0.8, 0.95),
            lung_x=rng.uniform(0.36, 0.42),
            lung_w=rng.uniform(0.26, 0.31),
            lung_top=rng.uniform(-0.78, -0.66),
            dome_y=rng.uniform(0.42, 0.55),
            heart_w=rng.uniform(0.26, 0.3),
            heart_h=rng.uniform(0.2, 0.24),
            heart_x=rng.uniform(0.04, 0.1),
            rib_phase=rng.uniform(0, 1),
            rib_count=rng.uniform(4.6, 5.4),
        )


class Film:
    """Builds one radiograph: an attenuation map where findings add or remove lung air."""

    def __init__(self, anatomy: Anatomy, case: SynthCase, rng: np.random.Generator, n: int):
        self.a, self.case, self.rng, self.n = anatomy, case, rng, n
        coords = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        self.x, self.y = coords[None, :], coords[:, None]
        self.heart_scale = 1.12 if case.view == "AP" else 1.0
        self.dome_shift = {-1: 0.0, 1: 0.0}  # per side (+ = lower diaphragm)
        self.lung_shrink = {-1: 1.0, 1: 1.0}
        self.opacity = np.zeros((n, n), np.float32)  # fraction of lung air replaced by fluid/tissue
        self.lucency = np.zeros((n, n), np.float32)  # extra air (pneumothorax, emphysema)
        self.marking_loss = np.zeros((n, n), np.float32)
        self.extra = np.zeros((n, n), np.float32)  # dense structures outside the lung air

    def lung(self, side: int) -> np.ndarray:
        """Soft mask of one lung (side -1 = image left = patient's right), tapering to the apex."""
        a, x, y = self.a, self.x, self.y
        cx = side * a.lung_x
        w = a.lung_w * self.lung_shrink[side]
        dome = a.dome_y + self.dome_shift[side] - (0.03 if side < 0 else 0.0)  # right dome sits higher
        top = a.lung_top
        t = np.clip((y - top) / (dome - top), 0.0, 1.0)
        width = w * (0.45 + 0.75 * np.sqrt(t))
        lateral = _sigmoid((width - np.abs(x - cx)) / 0.025)
        apex = _sigmoid((y - top - 0.5 * ((x - cx) / w) ** 2 * 0.3) / 0.02)
        dome_curve = dome - 0.12 * (1 - ((x - cx) / (w * 1.3)) ** 2)
        base = _sigmoid((dome_curve - y) / 0.02)
        return lateral * apex * base

    def heart(self) -> np.ndarray:
        a = self.a
        return _blob(self.x, self.y, a.heart_x, a.dome_y - 0.14, a.heart_w * self.heart_scale,
                     a.heart_h * self.heart_scale ** 0.5, 0.08)  # fmt: skip

    def render(self) -> np.ndarray:
        """Attenuation in [0, 1] (1 = dense) on the work grid."""
        a, x, y, rng, n = self.a, self.x, self.y, self.rng, self.n
        body = _sigmoid((a.body_w - np.abs(x) * (1 + 0.15 * y**2)) / 0.03) * _sigmoid((y + 0.98) / 0.02)
        lungs = np.clip(self.lung(-1) + self.lung(1), 0, 1)
        heart = self.heart()
        mediastinum = _sigmoid((0.11 + 0.04 * _sigmoid(y / 0.1) - np.abs(x - 0.02)) / 0.03) * _sigmoid(
            (a.dome_y + 0.1 - y) / 0.05
        )
        spine = _sigmoid((0.06 - np.abs(x)) / 0.012) * (0.85 + 0.15 * np.cos(y * 40 + a.rib_phase * 6))
        u = np.abs(x) - 0.05
        phase = (y - 0.9 * u**2 + 0.3 * u) * a.rib_count + a.rib_phase
        ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 2 * _sigmoid((0.85 - np.abs(x)) / 0.05)
        ribs *= _sigmoid((a.dome_y + 0.15 - y) / 0.05)
        clav_y = a.lung_top + 0.02 + 0.13 * (np.abs(x) - 0.1)
        clav = _sigmoid((0.028 - np.abs(y - clav_y)) / 0.008) * _sigmoid((0.55 - np.abs(x)) / 0.03)
        clav = clav * _sigmoid((np.abs(x) - 0.08) / 0.02)
        markings = _smooth_noise(rng, n, 40) * 0.5 + _smooth_noise(rng, n, 14)
        hilum = np.exp(-(((np.abs(x) - 0.2) / 0.12) ** 2 + ((y + 0.05) / 0.25) ** 2))
        markings = (markings * 0.03 + hilum * 0.08) * (1 - self.marking_loss)

        air = lungs * (1 - np.clip(heart * 1.1, 0, 1)) * (1 - np.clip(mediastinum, 0, 1))
        air = air * (1 - np.clip(self.opacity, 0, 1))
        density = 0.04 + 0.52 * body
        density = density - 0.4 * air - self.lucency * lungs + markings * air
        density = density + 0.17 * np.maximum(heart, mediastinum) * body + 0.06 * spine * body
        density = density + 0.08 * ribs * body + 0.14 * clav + self.extra
        return np.clip(density, 0, 1)


# --------------------------------------------------------------------------- findings


def _lung_point(f: Film, rng: np.random.Generator) -> tuple[int, float, float]:
    """A random (side, x, y) inside a lung, away from the heart."""
    side = int(rng.choice((-1, 1)))
    a = f.a
    y = rng.uniform(a.lung_top + 0.25, a.dome_y - 0.15)
    x = side * (a.lung_x + rng.uniform(-0.5, 0.6) * a.lung_w * 0.7)
    return side, x, y


def _nodule(f: Film, rng: np.random.Generator) -> None:
    _, cx, cy = _lung_point(f, rng)
    r = rng.uniform(0.03, 0.05)
    f.opacity += 0.9 * _blob(f.x, f.y, cx, cy, r, r, 0.15)
    f.extra += 0.1 * _blob(f.x, f.y, cx, cy, r, r, 0.15)


def _mass(f: Film, rng: np.random.Generator) -> None:
    _, cx, cy = _lung_point(f, rng)
    r = rng.uniform(0.07, 0.12)
    ang = np.arctan2(f.y - cy, f.x - cx)
    lobulated = r * (1 + 0.12 * np.cos(3 * ang + rng.uniform(0, 6)))
    d = np.sqrt((f.x - cx) ** 2 + (f.y - cy) ** 2) / lobulated
    m = _sigmoid((1 - d) / 0.08)
    f.opacity += m
    f.extra += 0.05 * m


def _effusion(f: Film, rng: np.random.Generator) -> None:
    side = int(rng.choice((-1, 1)))
    a = f.a
    level = a.dome_y - rng.uniform(0.3, 0.55)
    lateral = np.clip(side * (f.x - side * a.lung_x) / a.lung_w, -1, 1.5)
    meniscus = level - 0.12 * lateral  # fluid climbs the lateral chest wall
    m = _sigmoid((f.y - meniscus) / 0.03) * (side * f.x > 0.05)
    f.opacity += m
    f.extra += 0.08 * m


def _cardiomegaly(f: Film, rng: np.random.Generator) -> None:
    f.heart_scale *= rng.uniform(1.35, 1.55)


def _consolidation(f: Film, rng: np.random.Generator, patchy: float = 0.3) -> None:
    side, cx, cy = _lung_point(f, rng)
    region = _blob(f.x, f.y, cx, cy, rng.uniform(0.12, 0.2), rng.uniform(0.12, 0.22), 0.25)
    texture = np.clip(0.75 + patchy * _smooth_noise(rng, f.n, 24), 0, 1)
    f.opacity += region * texture


def _pneumonia(f: Film, rng: np.random.Generator) -> None:
    _consolidation(f, rng, patchy=0.6)


def _infiltration(f: Film, rng: np.random.Generator) -> None:
    side = int(rng.choice((-1, 1)))
    zone = _blob(f.x, f.y, side * f.a.lung_x, rng.uniform(-0.2, 0.25), 0.3, 0.45, 0.3)
    patches = _sigmoid((_smooth_noise(rng, f.n, 30) - 0.2) / 0.3)
    f.opacity += 0.6 * zone * patches


def _pneumothorax(f: Film, rng: np.random.Generator) -> None:
    side = int(rng.choice((-1, 1)))
    a = f.a
    collapse = rng.uniform(0.55, 0.8)
    # region between the chest wall and the collapsed lung's edge, largest at the apex
    cx = side * a.lung_x
    edge = cx + side * (
        a.lung_w * collapse * (0.45 + 0.75 * np.sqrt(np.clip((f.y - a.lung_top) / 1.2, 0, 1)))
    )
    rim = _sigmoid(side * (f.x - edge) / 0.01) * _sigmoid((a.dome_y - 0.25 - f.y) / 0.08)
    f.lucency += 0.1 * rim
    f.marking_loss = np.maximum(f.marking_loss, rim)
    line = np.exp(-(((f.x - edge) / 0.006) ** 2)) * _sigmoid((a.dome_y - 0.25 - f.y) / 0.08)
    f.extra += 0.12 * line * f.lung(side)


def _atelectasis(f: Film, rng: np.random.Generator) -> None:
    side = int(rng.choice((-1, 1)))
    f.dome_shift[side] = -rng.uniform(0.08, 0.15)  # elevated hemidiaphragm (volume loss)
    f.lung_shrink[side] = rng.uniform(0.85, 0.92)
    cy = f.a.dome_y - rng.uniform(0.25, 0.4)
    tilt = rng.uniform(-0.15, 0.15)
    band = _sigmoid((0.035 - np.abs(f.y - cy - tilt * (f.x - side * f.a.lung_x))) / 0.012)
    f.opacity += band * (side * f.x > 0.1)


def _edema(f: Film, rng: np.random.Generator) -> None:
    bat = np.exp(-(((np.abs(f.x) - 0.22) / 0.2) ** 2 + ((f.y + 0.02) / 0.35) ** 2))
    f.opacity += rng.uniform(0.6, 0.85) * bat
    kerley = (np.cos(f.y * 90) > 0.8) * _sigmoid((np.abs(f.x) - 0.6) / 0.03) * (f.y > 0.1)
    f.opacity += 0.3 * kerley


def _emphysema(f: Film, rng: np.random.Generator) -> None:
    shift = rng.uniform(0.08, 0.14)  # flattened, low diaphragm
    f.dome_shift[-1] += shift
    f.dome_shift[1] += shift
    f.lucency += 0.08
    f.marking_loss = np.maximum(f.marking_loss, 0.6 * _sigmoid((-0.1 - f.y) / 0.2))


def _fibrosis(f: Film, rng: np.random.Generator) -> None:
    net = np.abs(_smooth_noise(rng, f.n, 70))
    reticular = _sigmoid((0.3 - net) / 0.15)  # a network along the noise's zero lines
    zone = _sigmoid((f.y - 0.0) / 0.15) * _sigmoid((np.abs(f.x) - 0.3) / 0.1)
    f.opacity += 0.5 * reticular * zone + 0.2 * zone
    f.lung_shrink[-1] *= 0.93
    f.lung_shrink[1] *= 0.93


def _pleural_thickening(f: Film, rng: np.random.Generator) -> None:
    side = int(rng.choice((-1, 1)))
    a = f.a
    lateral_edge = side * (a.lung_x + a.lung_w * 0.95)
    rim = _sigmoid((0.05 - np.abs(f.x - lateral_edge)) / 0.012) * _sigmoid((a.dome_y - f.y) / 0.05)
    rim *= _sigmoid((f.y - a.lung_top - rng.uniform(0.1, 0.6)) / 0.05)
    f.opacity += rim
    f.extra += 0.1 * rim


def _hernia(f: Film, rng: np.random.Generator) -> None:
    cx, cy, r = -0.02 + rng.uniform(-0.03, 0.03), f.a.dome_y - 0.08, rng.uniform(0.08, 0.11)
    sac = _blob(f.x, f.y, cx, cy, r * 1.2, r, 0.1)
    gas = sac * _sigmoid((cy - 0.02 - f.y) / 0.01)  # air-fluid level
    f.extra += 0.15 * sac - 0.3 * gas


FINDING_DRAWERS: dict[str, Callable[[Film, np.random.Generator], None]] = {
    "atelectasis": _atelectasis,
    "cardiomegaly": _cardiomegaly,
    "effusion": _effusion,
    "infiltration": _infiltration,
    "mass": _mass,
    "nodule": _nodule,
    "pneumonia": _pneumonia,
    "pneumothorax": _pneumothorax,
    "consolidation": _consolidation,
    "edema": _edema,
    "emphysema": _emphysema,
    "fibrosis": _fibrosis,
    "pleural_thickening": _pleural_thickening,
    "hernia": _hernia,
}


# --------------------------------------------------------------------------- rendering


def render_case(case: SynthCase, seed: int = 0, size: int = 1024) -> np.ndarray:
    """The radiograph for ``case`` as float32 in [0, 1], shape (size, size). Deterministic."""
    anatomy = Anatomy.sample(np.random.default_rng([seed, 1, case.patient]))
    rng = np.random.default_rng([seed, 2, case.index])
    work = min(size, WORK_SIZE)
    film = Film(anatomy, case, rng, work)
    for i, flag in enumerate(case.findings):
        if flag:
            FINDING_DRAWERS[FINDINGS[i]](film, rng)
    gamma = rng.uniform(0.8, 1.25)
    gain, offset = rng.uniform(0.85, 1.1), rng.uniform(-0.04, 0.06)
    img = (film.render() ** gamma * gain + offset).astype(np.float32)  # exposure, on the small grid
    if work != size:
        img = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    oy, ox = rng.integers(0, NOISE_PAD, size=2)
    noise = _noise_bank(size, seed)[oy : oy + size, ox : ox + size] * np.float32(rng.uniform(0.01, 0.025))
    noise += img  # quantum mottle at full resolution
    return np.clip(noise, 0.0, 1.0, out=noise)


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int, seed: int) -> np.ndarray:
    """One white-noise field per (size, seed); each image takes a random window of it.

    Drawing 1M normals costs ~9 ms, a third of the time budget per 1024 px image; a shifted window
    of a shared field is just as white and costs nothing.
    """
    rng = np.random.default_rng([seed, 3, size])
    return rng.standard_normal((size + NOISE_PAD, size + NOISE_PAD), dtype=np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (img * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- layouts


def generate(
    out: str | Path, n: int, *, layout: str = "chestxray14", seed: int = 0, size: int = 1024, workers: int = 1
) -> SynthResult:
    """Write ``n`` synthetic radiographs and their metadata to ``out`` in ``layout``.

    ``workers`` > 1 renders and encodes the PNG layouts in that many processes (same files: each image
    depends only on its case and the seed); benchmarks need tens of thousands of 1024 px images.

    chestxray14: ``images_001/images/*.png`` (10,000 per folder), ``Data_Entry_2017_v2020.csv``,
    ``train_val_list.txt``, ``test_list.txt``. folder: ``normal/`` and ``abnormal/`` PNGs plus
    ``labels.csv``. dicom: ``<patient>/<study>/*.dcm`` (12-bit MONOCHROME2 DX with window tags and
    synthetic identifying fields, which the DICOM reader must drop) plus ``labels.csv``.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    if not 32 <= size <= 4096:
        raise ConfigError("--size must be between 32 and 4096 pixels.")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cases = plan_cases(n, seed)
    if layout == "dicom":
        _write_dicom(root, cases, seed, size)
    else:
        writer = _write_chestxray14 if layout == "chestxray14" else _write_folder
        writer(root, cases, seed, size, workers)
    counts = {name: sum(c.findings[i] for c in cases) for i, name in enumerate(FINDINGS)}
    result = SynthResult(
        out=str(root.resolve()),
        layout=layout,
        size=size,
        seed=seed,
        n_images=len(cases),
        n_patients=len({c.patient for c in cases}),
        n_abnormal=sum(c.label for c in cases),
        n_test=sum(c.split == "test" for c in cases),
        finding_counts=counts,
    )
    write_json_atomic(result.__dict__, root / "synth.json")
    return result


def _write_chestxray14(root: Path, cases: list[SynthCase], seed: int, size: int, workers: int) -> None:
    from cxr_embed.readers.chestxray14 import write_data_entry, write_split_lists

    _save_pngs([(c, root / f"images_{c.index // 10000 + 1:03d}" / "images" / c.image_id) for c in cases], seed, size,
               workers)
    rows = [
        {"image_id": c.image_id, "findings": c.findings, "study": c.study, "patient_id": c.patient, "age": c.age,
         "sex": c.sex, "view": c.view, "width": size, "height": size, "spacing": 0.143 * 1024 / size}
        for c in cases
    ]  # fmt: skip
    write_data_entry(root / "Data_Entry_2017_v2020.csv", rows)
    write_split_lists(root, {c.image_id: c.split for c in cases})


def _labels_csv(root: Path, rows: list[tuple[str, ...]]) -> None:
    header = "path,image_id,label,finding_labels,patient_id,study,split,sex,age,view"
    (root / "labels.csv").write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))


def _csv_row(c: SynthCase, path: str, image_id: str) -> tuple[str, ...]:
    from cxr_embed.readers.chestxray14 import format_finding_labels

    return (path, image_id, str(c.label), format_finding_labels(c.findings), str(c.patient), str(c.study),
            c.split, c.sex, str(c.age), c.view)  # fmt: skip


def _write_folder(root: Path, cases: list[SynthCase], seed: int, size: int, workers: int) -> None:
    rels = [f"{'abnormal' if c.label else 'normal'}/{c.image_id}" for c in cases]
    _save_pngs([(c, root / rel) for c, rel in zip(cases, rels, strict=True)], seed, size, workers)
    _labels_csv(root, [_csv_row(c, rel, rel) for c, rel in zip(cases, rels, strict=True)])


def _save_png(job: tuple[SynthCase, Path], seed: int, size: int) -> None:
    case, path = job
    Image.fromarray(to_uint8(render_case(case, seed, size)), mode="L").save(path, compress_level=1)


def _save_pngs(jobs: list[tuple[SynthCase, Path]], seed: int, size: int, workers: int) -> None:
    """Render and write each (case, path), in ``workers`` processes when more than one."""
    for folder in {path.parent for _, path in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    save = functools.partial(_save_png, seed=seed, size=size)
    if workers <= 1:
        for job in jobs:
            save(job)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(save, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


def _write_dicom(root: Path, cases: list[SynthCase], seed: int, size: int) -> None:
    rows = []
    for c in cases:
        rel = f"{c.patient:08d}/{c.study:03d}/{Path(c.image_id).stem}.dcm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(render_case(c, seed, size) * 4095.0).astype(np.uint16)
        ds = synthetic_dicom(pixels, c, seed)
        ds.save_as(root / rel, enforce_file_format=True)
        rows.append(_csv_row(c, rel, str(ds.SOPInstanceUID)))
    _labels_csv(root, rows)


def synthetic_dicom(pixels: np.ndarray, case: SynthCase, seed: int):
    """A DX "for presentation" dataset: 12-bit MONOCHROME2 in 16 bits, window tags, and synthetic
    identifying fields (name, birth date, accession, institution, comments) that readers must drop."""
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[f"cxr-embed-synth/{seed}", *map(str, parts)])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid("image", case.index)
    ds.StudyInstanceUID = uid("study", case.patient, case.study)
    ds.SeriesInstanceUID = uid("series", case.patient, case.study)
    ds.Modality, ds.BodyPartExamined, ds.PresentationIntentType = "DX", "CHEST", "FOR PRESENTATION"
    ds.PatientName = f"SYNTHETIC^PATIENT{case.patient:06d}"
    ds.PatientID = f"SYN{case.patient:06d}"
    ds.PatientBirthDate = f"{2000 - case.age:04d}0101"
    ds.PatientSex, ds.PatientAge, ds.ViewPosition = case.sex, f"{case.age:03d}Y", case.view
    ds.AccessionNumber = f"ACC{case.index:07d}"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "SYNTHETIC^DOCTOR"
    ds.ImageComments = "synthetic radiograph made by cxr-embed synth"
    ds.StudyDate = (datetime.date(2020, 1, 1) + datetime.timedelta(days=90 * case.study)).strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    spacing = round(0.143 * 1024 / pixels.shape[0], 4)
    ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds
