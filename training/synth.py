"""Synthetic SIIM-ACR data: chest-radiograph phantoms with pneumothorax masks, in the stage-1 layout.

`generate(out)` writes `dicom-images-train/<study>/<series>/<sop>.dcm` and `train-rle.csv` exactly
as the original release does, plus unlabelled DICOMs and orphan label rows, so the real reader is
exercised end to end. `render` draws one image in memory (for tests and learnability checks).

Geometry lives in a patient frame (u right, v down, both 0..1 across the image before the pose is
applied). Each lung is described in its own elliptical polar coordinates: the pleura lies at
rho = r(phi) ~ 1 (a few random harmonics), angle phi = 0 at the apex and pi/2 at the lateral
rim. A pneumothorax is a crescent between the pleura and the collapsed lung edge, rho in
[r(phi)*(1 - w(phi)), r(phi)], over an arc of the rim; the mask is exactly that crescent inside
the lung.

Lesion statistics follow the real stage-2 labels (decoded at 1024 x 1024): log10 of one
region's mask fraction has mean -2.21 and sd 0.46 (the union per image: -2.10 and 0.48; 5%..95%
0.12%..4.6%, max 12%); 77% of positive images have one region, 17% two, 6% three or more; ~7%
of positive images have overlapping regions; ~79% of region centroids lie in the upper half;
57% of regions are in the patient's right lung (image left).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from study.atomic import write_text_atomic
from study.config import SyntheticData
from study.errors import CamstudyError
from training import rle
from training.dicom import write_jpeg_dicom

DICOM_DIR = "dicom-images-train"
LABEL_FILE = "train-rle.csv"
PARAMS_FILE = "synth.json"
FORMAT_VERSION = 1  # bump when the images change, so old folders are regenerated

# UIDs like the SIIM ones: <root>.<2 study | 3 series | 4 instance>.8323329.<n>.<epoch s>.<counter>
_UID_ROOT = "1.2.276.0.7230010.3.1"
_UID_ORG = 8323329
_EPOCH = 1517875000  # SIIM files carry timestamps of early Feb 2018

# Lesion statistics of the real labels (see module docstring).
_LOG10_FRACTION_MEAN, _LOG10_FRACTION_SD = -2.21, 0.46  # per region
_MAX_FRACTION = 0.10
_MIN_FRACTION = 5e-4
_MIN_REGION_PIXELS = 12  # smaller lesions vanish at 64 px and cannot be encoded at tiny sizes
_REGION_COUNT_P = (0.77, 0.17, 0.06)  # 1, 2, 3 regions
_OVERLAP_P = 0.25  # among multi-region images; 3-region images overlap more often
_RIGHT_LUNG_P = 0.57  # patient right = image left
_MAX_DEPTH = 0.75  # crescent width as a fraction of the lung radius (near-total collapse)
_TAPER_POWER = 0.7  # crescent width ~ (1 - t^2)^p along the arc: blunt middle, pointed ends

# Lesion appearance at contrast 1 (attenuation units; lung air sits ~0.3 below soft tissue).
# Tuned for "learnable, not trivial": at contrast 0.5, a 4-conv-layer CNN trained from scratch at
# 64 px on 400 images reaches validation AUC ~0.58 after 1 epoch and ~0.75 after 5.
_LESION_DARKENING = 0.16
_PLEURAL_LINE = 0.12

# Extra SeedSequence words that keep the dataset-level streams apart from the per-image ones.
_PLAN_STREAM, _HEADER_STREAM, _ORDER_STREAM = 0x504C414E, 0x48454144, 0x4F524452


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    positives: int
    negatives: int
    multi_region: int  # positives with two or more label rows
    overlapping: int  # positives whose regions overlap (rows OR to less than their sum)
    unlabelled: int  # DICOMs without a label row
    orphans: int  # label rows without a DICOM
    reused: bool = False  # the folder already held this dataset; nothing was written

    def __str__(self) -> str:
        verb = "already complete" if self.reused else "written"
        return (f"synthetic SIIM data {verb} in {self.out}: {self.positives} positive "
                f"({self.multi_region} multi-region, {self.overlapping} overlapping), "
                f"{self.negatives} negative, {self.unlabelled} unlabelled DICOMs, "
                f"{self.orphans} orphan label rows")


@dataclass(frozen=True)
class Phantom:
    """One rendered image with its ground truth."""

    pixels: np.ndarray  # (size, size) uint8, MONOCHROME2
    regions: tuple[np.ndarray, ...]  # one bool mask per lesion region; empty for negatives
    lungs: np.ndarray  # bool, both lung fields (where lesions may lie)

    @property
    def mask(self) -> np.ndarray:
        return np.logical_or.reduce(self.regions) if self.regions else np.zeros(self.pixels.shape, bool)


@dataclass(frozen=True)
class _Case:
    index: int
    role: str  # "labelled", "unlabelled" (DICOM, no label row) or "orphan" (label row, no DICOM)
    positive: bool
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class _Labels:
    rles: tuple[str, ...]  # one per region; empty for a negative
    overlapping: bool


@dataclass(frozen=True)
class _Lung:
    side: int  # -1 image left (patient right), +1 image right
    rho: np.ndarray  # elliptical radius; the pleura lies at rho = edge
    phi: np.ndarray  # 0 apex, pi/2 lateral, +-pi base, -pi/2 medial
    edge: np.ndarray  # r(phi): the pleura's radius in this direction
    inside: np.ndarray  # bool, below the apex and above the diaphragm
    dome: np.ndarray  # v of the diaphragm under this lung
    pixel_scale: np.ndarray  # pixels per unit of rho along the radius


@dataclass(frozen=True)
class _Crescent:
    side: int
    centre: float  # arc centre angle phi
    half_arc: float  # radians
    depth: float  # peak width as a fraction of r(phi)


# --- public API -------------------------------------------------------------------------------


DEFAULTS = SyntheticData()  # the config's data.synthetic defaults, the one statement of them


def generate(out: str | Path, n: int = DEFAULTS.n, size: int = DEFAULTS.size, seed: int = DEFAULTS.seed,
             positive_fraction: float = DEFAULTS.positive_fraction, contrast: float = DEFAULTS.contrast,
             unlabelled: int = DEFAULTS.unlabelled, orphans: int = DEFAULTS.orphans,
             lesion_scale: float = DEFAULTS.lesion_scale) -> SynthSummary:
    """Write a synthetic dataset in the SIIM stage-1 layout under `out` and summarise it.

    `n` labelled images, `unlabelled` extra DICOMs without a label row, `orphans` label rows
    without a DICOM. `lesion_scale` multiplies every lesion's area (1 = the real distribution;
    larger makes lesions visible to networks at small image sizes, e.g. the 64-px demo).
    A folder that already holds the same dataset is left as it is.
    """
    params = _validated_params(n, size, seed, positive_fraction, contrast, unlabelled, orphans)
    if not 0 < lesion_scale <= 20:
        raise CamstudyError(f"lesion_scale must be in (0, 20], got {lesion_scale!r}")
    if lesion_scale != 1.0:  # recorded only when used, so existing datasets stay valid
        params["lesion_scale"] = float(lesion_scale)
    out = Path(out)
    recorded = _recorded(out)
    if _is_complete(out, recorded, params):
        return SynthSummary(out=out, reused=True, **recorded["summary"])
    _clear_previous(out, recorded)
    # written first and marked incomplete: a crash leaves a folder that the next run redoes
    write_text_atomic(out / PARAMS_FILE, json.dumps({"params": params, "complete": False}, indent=2))
    cases = _plan(n, seed, positive_fraction, unlabelled, orphans)
    labels = {case.sop_uid: _write_case(out, case, size, seed, contrast, lesion_scale) for case in cases}
    write_text_atomic(out / LABEL_FILE, _label_csv(cases, labels, seed))
    summary = _summarise(out, cases, labels)
    record = {"params": params, "complete": True, "summary": _summary_counts(summary)}
    write_text_atomic(out / PARAMS_FILE, json.dumps(record, indent=2))
    return summary


def render(size: int, seed: int, index: int, positive: bool, contrast: float = DEFAULTS.contrast,
           lesion_scale: float = DEFAULTS.lesion_scale) -> Phantom:
    """Draw image `index` of the dataset with `seed` at `size` x `size` pixels.

    Anatomy, pose, exposure and noise come from streams of their own, so the image is the same
    whether or not it is positive: at contrast 0 a positive is pixel-identical to its negative
    twin, and nothing depends on the order in which images are drawn.
    """
    anatomy_rng, lesion_rng, noise_rng = map(np.random.default_rng,
                                             np.random.SeedSequence([seed, index]).spawn(3))
    anatomy = _sample_anatomy(anatomy_rng)
    u, v = _patient_frame(size, anatomy)
    lungs = [_lung_field(u, v, size, anatomy, side) for side in (-1, 1)]
    regions = _sample_regions(lesion_rng, lungs, size, lesion_scale) if positive else ()
    attenuation = _anatomy_attenuation(u, v, size, anatomy, lungs, regions, contrast, anatomy_rng)
    pixels = _expose(attenuation, anatomy, noise_rng)
    return Phantom(pixels, tuple(mask for mask, _ in regions), lungs[0].inside | lungs[1].inside)


# --- parameters and the resume protocol --------------------------------------------------------


def _validated_params(n, size, seed, positive_fraction, contrast, unlabelled, orphans) -> dict:
    _check_int("n", n, 1)
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    _check_int("unlabelled", unlabelled, 0)
    _check_int("orphans", orphans, 0)
    _check_unit("positive_fraction", positive_fraction)
    _check_unit("contrast", contrast)
    return {"version": FORMAT_VERSION, "n": int(n), "size": int(size), "seed": int(seed),
            "positive_fraction": float(positive_fraction), "contrast": float(contrast),
            "unlabelled": int(unlabelled), "orphans": int(orphans)}


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CamstudyError(f"synth: {name} must be an integer >= {minimum}; got {value!r}")


def _check_unit(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise CamstudyError(f"synth: {name} must be a number in [0, 1]; got {value!r}")


def _recorded(out: Path) -> dict | None:
    """The folder's synth.json; None when there is none, {} when it cannot be read (redo)."""
    path = out / PARAMS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _is_complete(out: Path, recorded: dict | None, params: dict) -> bool:
    return (bool(recorded) and recorded.get("params") == params and recorded.get("complete") is True
            and (out / LABEL_FILE).is_file() and (out / DICOM_DIR).is_dir())


def _clear_previous(out: Path, recorded: dict | None) -> None:
    """Remove a previous or interrupted synthetic dataset; refuse to touch anything else."""
    ours = [out / DICOM_DIR, out / LABEL_FILE]
    if recorded is None and any(path.exists() for path in ours):
        raise CamstudyError(f"synth: {out} already holds {DICOM_DIR}/ or {LABEL_FILE} not written by "
                            f"`camstudy synth` (no {PARAMS_FILE}); choose an empty or new --out folder")
    shutil.rmtree(out / DICOM_DIR, ignore_errors=True)
    (out / LABEL_FILE).unlink(missing_ok=True)


def _summary_counts(summary: SynthSummary) -> dict:
    counts = asdict(summary)
    del counts["out"], counts["reused"]
    return counts


# --- the dataset plan: who is positive, UIDs, roles --------------------------------------------


def _plan(n: int, seed: int, positive_fraction: float, unlabelled: int, orphans: int) -> list[_Case]:
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    total = n + unlabelled + orphans
    roles = ["labelled"] * n + ["unlabelled"] * unlabelled + ["orphan"] * orphans
    positives = set(rng.permutation(n)[:round(n * positive_fraction)].tolist())
    first_counter = int(rng.integers(1000, 30000))  # SIIM's 6th UID field; unique per image
    stamps = _EPOCH + np.sort(rng.integers(0, 20000, total))
    counters = rng.integers(100000, 999000, total)
    return [_Case(index=i, role=role,
                  positive=i in positives if role == "labelled" else i % 2 == 1,
                  **_uids(first_counter + i, int(stamps[i]), int(counters[i])))
            for i, role in enumerate(roles)]


def _uids(image_number: int, stamp: int, counter: int) -> dict:
    """Study, series and instance UIDs of one image; SIIM numbers them counter+1, +0, +2."""
    def uid(level: int, offset: int) -> str:
        return f"{_UID_ROOT}.{level}.{_UID_ORG}.{image_number}.{stamp}.{counter + offset}"
    return {"study_uid": uid(2, 1), "series_uid": uid(3, 0), "sop_uid": uid(4, 2)}


# --- writing ---------------------------------------------------------------------------------


def _write_case(out: Path, case: _Case, size: int, seed: int, contrast: float, lesion_scale: float) -> _Labels:
    """Write the case's DICOM (unless it is an orphan) and return its label rows."""
    phantom = render(size, seed, case.index, case.positive, contrast, lesion_scale)
    if case.role != "orphan":
        path = out / DICOM_DIR / case.study_uid / case.series_uid / f"{case.sop_uid}.dcm"
        write_jpeg_dicom(path, phantom.pixels, sop_uid=case.sop_uid, study_uid=case.study_uid,
                         series_uid=case.series_uid, **_header(seed, case.index, size))
    # masks are not kept: at 1024 px they would hold hundreds of MB
    return _Labels(tuple(rle.encode(mask) for mask in phantom.regions), _overlap(phantom.regions))


def _header(seed: int, index: int, size: int) -> dict:
    rng = np.random.default_rng([seed, index, _HEADER_STREAM])
    # SIIM: ~0.14-0.17 mm at 1024 px; keep the physical field of view at other sizes
    spacing = float(rng.uniform(0.139, 0.171)) * 1024 / size
    day = np.datetime64("2017-01-01") + rng.integers(0, 365)
    return {"patient_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            "patient_sex": str(rng.choice(["M", "F"], p=[0.55, 0.45])),
            "patient_age": str(int(np.clip(rng.normal(47, 17), 16, 92))),  # bare number, as in SIIM
            "view_position": str(rng.choice(["PA", "AP"], p=[0.6, 0.4])),
            "pixel_spacing": round(spacing, 6),
            "content_date": str(day).replace("-", "")}


def _label_csv(cases: list[_Case], labels: dict[str, _Labels], seed: int) -> str:
    """Stage-1 format: `ImageId, EncodedPixels`, a space before every value, one row per region."""
    rows = []
    for case in cases:
        if case.role != "unlabelled":
            texts = labels[case.sop_uid].rles or (rle.EMPTY,)
            rows.extend((case.sop_uid, f" {text}") for text in texts)
    # the real file is not sorted by label; keep an image's rows together as SIIM does
    order = np.random.default_rng([seed, _ORDER_STREAM]).permutation(len(cases))
    rank = {cases[i].sop_uid: position for position, i in enumerate(order)}
    rows.sort(key=lambda row: rank[row[0]])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ImageId", " EncodedPixels"])
    writer.writerows(rows)
    return buffer.getvalue()


def _summarise(out: Path, cases: list[_Case], labels: dict[str, _Labels]) -> SynthSummary:
    labelled = [labels[case.sop_uid] for case in cases if case.role == "labelled"]
    positives = [image for image in labelled if image.rles]
    return SynthSummary(out=out, positives=len(positives), negatives=len(labelled) - len(positives),
                        multi_region=sum(len(image.rles) > 1 for image in positives),
                        overlapping=sum(image.overlapping for image in positives),
                        unlabelled=sum(case.role == "unlabelled" for case in cases),
                        orphans=sum(case.role == "orphan" for case in cases))


def _overlap(masks: tuple[np.ndarray, ...]) -> bool:
    return len(masks) > 1 and sum(int(m.sum()) for m in masks) > int(np.logical_or.reduce(masks).sum())


# --- anatomy ---------------------------------------------------------------------------------


def _sample_anatomy(rng: np.random.Generator) -> dict:
    """Random patient, pose and exposure. Units: the patient frame, 0..1 across the image."""
    return {key: _weak(value) for key, value in _draw_anatomy(rng).items()}


def _weak(value):
    """Python floats and float32 arrays: a NumPy float64 scalar would promote every image
    computation to float64 (NEP 50), doubling the time."""
    if isinstance(value, tuple):
        return tuple(_weak(item) for item in value)
    return value.astype(np.float32) if isinstance(value, np.ndarray) else float(value)


def _draw_anatomy(rng: np.random.Generator) -> dict:
    return {
        "rotation": rng.normal(0, np.radians(2.5)), "shift": rng.normal(0, 0.02, 2),
        "scale": rng.uniform(0.92, 1.06),
        "body_halfwidth": rng.uniform(0.40, 0.46),
        "lung_offset": rng.uniform(0.2, 0.24), "lung_centre_v": rng.uniform(0.40, 0.45),
        "lung_radii": (rng.uniform(0.15, 0.175), rng.uniform(0.30, 0.36)),
        "lung_asymmetry": rng.uniform(0.94, 1.04, 2),  # per side, scales both radii
        "lung_shear": rng.uniform(0.15, 0.4),
        "lung_harmonics": rng.normal(0, 0.025, (2, 3, 2)),  # side, k=2..4, cos/sin
        "dome_height": rng.uniform(0.04, 0.09, 2), "dome_base": rng.uniform(0.74, 0.84, 2),
        "heart": (rng.uniform(0.04, 0.08), rng.uniform(0.60, 0.66),  # centre offset, v
                  rng.uniform(0.16, 0.21), rng.uniform(0.12, 0.16)),  # radii
        "rib_start": rng.uniform(0.06, 0.10), "rib_spacing": rng.uniform(0.062, 0.075),
        "rib_curve": (rng.uniform(0.15, 0.35), rng.uniform(1.0, 1.6)),
        "clavicle": (rng.uniform(0.12, 0.16), rng.uniform(0.15, 0.3)),
        "gain": rng.uniform(0.95, 1.3), "bias": rng.uniform(-0.06, 0.06),
        "gamma": rng.uniform(0.8, 1.25), "heel": rng.normal(0, 0.05, 2),
        "noise": rng.uniform(0.008, 0.02),
    }


def _patient_frame(size: int, anatomy: dict) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (u, v) of every pixel centre: the inverse of the patient's pose."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = x[None, :] - anatomy["shift"][0], x[:, None] - anatomy["shift"][1]
    cos, sin, scale = np.cos(anatomy["rotation"]), np.sin(anatomy["rotation"]), anatomy["scale"]
    return ((0.5 + (cos * x + sin * y) / scale).astype(np.float32),
            (0.5 + (cos * y - sin * x) / scale).astype(np.float32))


def _lung_field(u, v, size: int, anatomy: dict, side: int) -> _Lung:
    k = 0 if side < 0 else 1
    ax, ay = (radius * anatomy["lung_asymmetry"][k] for radius in anatomy["lung_radii"])
    centre_u = 0.5 + side * anatomy["lung_offset"]
    up = (anatomy["lung_centre_v"] - v) / ay
    # shear: the apex sits medially and the lateral wall slopes outwards going down
    lateral = side * (u - centre_u) / ax + anatomy["lung_shear"] * up
    rho = np.hypot(lateral, up)
    cos, sin = up / np.maximum(rho, 1e-6), lateral / np.maximum(rho, 1e-6)
    edge, cos_k, sin_k = np.ones_like(rho), cos, sin
    for a, b in anatomy["lung_harmonics"][k]:  # orders 2, 3, 4 (angle addition, no trig calls)
        cos_k, sin_k = cos_k * cos - sin_k * sin, sin_k * cos + cos_k * sin
        edge += a * cos_k + b * sin_k
    # diaphragm dome: highest under the lung's middle, lower at the costophrenic sulci
    dome = anatomy["dome_base"][k] - anatomy["dome_height"][k] * np.exp(-((u - centre_u) / ax) ** 2)
    inside = (rho < edge) & (v < dome)
    pixel_scale = np.hypot(ax * sin, ay * cos) * (size * anatomy["scale"])
    return _Lung(side, rho, np.arctan2(lateral, up), edge, inside, dome, pixel_scale)


def _anatomy_attenuation(u, v, size, anatomy, lungs, regions, contrast, rng) -> np.ndarray:
    """Attenuation (bright = dense) of soft tissue, bone and air, lesions included."""
    air, markings = _lung_air_and_markings(lungs, _vessel_texture(size, rng), size)
    lesion, line = _lesion_fields(lungs, regions)
    from_edge = anatomy["body_halfwidth"] * _neck_profile(v) - np.abs(u - 0.5)
    body = _soft_step(from_edge, 0.012)
    return (body * (_soft_tissue(v, from_edge, lungs) + _ribs(u, v, anatomy) + _clavicles(u, v, anatomy))
            + _mediastinum(u, v, anatomy)
            - 0.30 * air + 0.14 * markings * (1 - contrast * lesion)
            - contrast * _LESION_DARKENING * lesion + contrast * _PLEURAL_LINE * line)


def _lung_air_and_markings(lungs, texture, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Air path length (thin near the pleura, full 20% of the radius in) and vessel markings
    (densest at the hilum, faint but present out to the pleura)."""
    air = np.zeros_like(texture)
    markings = np.zeros_like(texture)
    for lung in lungs:
        depth = np.clip(1 - lung.rho / lung.edge, 0, 1) * lung.inside
        air += lung.inside * (0.65 + 0.35 * np.minimum(depth * 5, 1))
        markings += lung.inside * texture * (0.35 + 0.65 * depth)
    return cv2.GaussianBlur(air, (0, 0), max(0.7, size / 250)), markings  # soft pleural edges


def _soft_tissue(v, from_edge, lungs) -> np.ndarray:
    """Inside the body: chest wall (brighter where the beam grazes it) and abdomen."""
    wall = 0.42 + 0.08 * np.exp(-np.maximum(from_edge, 0) / 0.05)
    return wall + _abdomen(v, lungs)


def _soft_step(x, width: float) -> np.ndarray:
    return (0.5 + 0.5 * np.tanh(x / width)).astype(np.float32)


def _neck_profile(v) -> np.ndarray:
    """Body half-width relative to the thorax: the neck above the shoulders (v ~ 0.06)."""
    return 0.32 + 0.68 * _soft_step(v - 0.06, 0.03)


def _abdomen(v, lungs) -> np.ndarray:
    return 0.10 * _soft_step(v - np.minimum(lungs[0].dome, lungs[1].dome), 0.006)


def _mediastinum(u, v, anatomy) -> np.ndarray:
    """Spine (dense), the air-filled trachea above the carina (v ~ 0.3), and the heart."""
    d = np.abs(u - 0.5)
    spine = 0.10 * _soft_step(0.03 + 0.02 * v - d, 0.008)
    trachea = 0.07 * _soft_step(0.016 - d, 0.004) * _soft_step(0.3 - v, 0.02)
    du, cv, ru, rv = anatomy["heart"]
    heart = 0.16 * _soft_step(1 - np.hypot((u - 0.5 - du) / ru, (v - cv) / rv), 0.08)
    return spine - trachea + heart


def _ribs(u, v, anatomy) -> np.ndarray:
    """Posterior ribs: periodic curved bands, rising laterally off the spine, then falling."""
    d = np.abs(u - 0.5)
    rise, fall = anatomy["rib_curve"]
    phase = (v - anatomy["rib_start"] + rise * d - fall * d * d) / anatomy["rib_spacing"]
    band = np.exp(-((phase - np.floor(phase) - 0.5) / 0.2) ** 2)
    return 0.07 * band * (phase > 0) * (phase < 10) * _soft_step(d - 0.05, 0.01)


def _clavicles(u, v, anatomy) -> np.ndarray:
    medial_v, slope = anatomy["clavicle"]
    d = np.abs(u - 0.5)
    centre = medial_v - slope * (d - 0.05) + 0.4 * (d - 0.05) * (d - 0.33)
    extent = _soft_step(d - 0.05, 0.01) * _soft_step(0.33 - d, 0.02)
    return 0.13 * np.exp(-((v - centre) / 0.014) ** 2) * extent


def _vessel_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Branching-looking vessels: ridges where band-limited noise crosses zero, two scales."""
    texture = np.zeros((size, size), np.float32)
    for cells, weight in ((12, 0.6), (24, 0.4)):
        noise = cv2.resize(rng.normal(0, 1, (cells, cells)).astype(np.float32), (size, size),
                           interpolation=cv2.INTER_CUBIC)
        texture += weight * np.exp(-(noise / 0.35) ** 2)
    return texture


def _expose(attenuation: np.ndarray, anatomy: dict, rng: np.random.Generator) -> np.ndarray:
    """Film response: gain, offset, gamma, a heel-effect gradient, quantum noise -> uint8."""
    size = attenuation.shape[0]
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    heel = 1 + anatomy["heel"][0] * ramp[None, :] + anatomy["heel"][1] * ramp[:, None]
    exposed = np.clip(anatomy["gain"] * attenuation * heel + anatomy["bias"], 0, 1) ** anatomy["gamma"]
    exposed = exposed + rng.normal(0, anatomy["noise"], exposed.shape).astype(np.float32)
    return np.clip(np.rint(exposed * 255), 0, 255).astype(np.uint8)


# --- lesions ---------------------------------------------------------------------------------


def _sample_regions(rng, lungs: list[_Lung], size: int, scale: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """1-3 crescents as (mask, pleural-line) pairs; every mask has at least a few pixels."""
    count = 1 + int(rng.choice(3, p=_REGION_COUNT_P))
    first = _sample_crescent(rng, size, lungs, scale=scale)
    crescents = [first]
    overlap = rng.random() < _OVERLAP_P
    for _ in range(count - 1):
        crescents.append(_neighbour_crescent(rng, size, lungs, first, overlap, scale))
    return [_rasterise_or_retry(rng, size, lungs, crescent, scale) for crescent in crescents]


def _rasterise_or_retry(rng, size, lungs, crescent: _Crescent, scale: float) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(20):
        mask, line = _rasterise(_lung_of(lungs, crescent.side), crescent, size)
        if mask.sum() >= _MIN_REGION_PIXELS:
            return mask, line
        crescent = _sample_crescent(rng, size, lungs, scale=scale)  # clipped away by the dome or apex
    raise CamstudyError(f"synth: size {size} px is too small to draw a lesion; use size >= 32")


def _lung_of(lungs: list[_Lung], side: int) -> _Lung:
    return lungs[0] if side < 0 else lungs[1]


def _sample_crescent(rng, size: int, lungs: list[_Lung], side: int | None = None,
                     centre: float | None = None, scale: float = 1.0) -> _Crescent:
    if side is None:
        side = -1 if rng.random() < _RIGHT_LUNG_P else 1
    if centre is None:
        # mostly apical to upper-lateral rim, a third lower lateral / costophrenic
        centre = rng.normal(0.25, 0.45) if rng.random() < 0.65 else rng.uniform(0.8, 2.4)
    fraction = min(_sample_fraction(rng, size) * scale, 0.3)
    disc_area = float((_lung_of(lungs, side).rho < 1).mean())  # image fraction, pose included
    half_arc, depth = _crescent_shape(fraction / disc_area, rng)
    return _Crescent(side, float(np.clip(centre, -0.6, 2.2)), half_arc, depth)


def _sample_fraction(rng, size: int) -> float:
    low = np.log10(max(_MIN_FRACTION, _MIN_REGION_PIXELS / size**2))
    draw = rng.normal(_LOG10_FRACTION_MEAN, _LOG10_FRACTION_SD)
    return float(10 ** np.clip(draw, low, np.log10(_MAX_FRACTION)))


def _crescent_shape(lung_share: float, rng) -> tuple[float, float]:
    """Arc half-width and peak depth giving `lung_share` of the lung's unit-disc area.

    The share of a crescent over t = (phi - centre)/half_arc in [-1, 1] with width
    w = depth * taper(t) is half_arc * (depth * I1 - depth^2 * I2 / 2) / pi (for r = 1).
    Small lesions are short arcs; big ones wrap around the lung.
    """
    share = lung_share * np.pi
    half_arc = float(np.clip(0.3 + 0.3 * (np.log10(lung_share) + 2.5) + rng.normal(0, 0.1), 0.2, 2.6))
    i1, i2 = _TAPER_INTEGRALS
    q = min(share / half_arc, _MAX_DEPTH * i1 - _MAX_DEPTH**2 * i2 / 2)
    if share / half_arc > q:  # too much area for this arc: deepen to the maximum, widen the arc
        half_arc = float(min(share / q, 3.0))
    depth = (i1 - np.sqrt(max(i1 * i1 - 2 * i2 * q, 0.0))) / i2
    return half_arc, float(depth)


def _taper_integrals() -> tuple[float, float]:
    t = np.linspace(-1, 1, 2001)
    taper = (1 - t * t) ** _TAPER_POWER
    return float(np.trapezoid(taper, t)), float(np.trapezoid(taper * taper, t))


_TAPER_INTEGRALS = _taper_integrals()


def _neighbour_crescent(rng, size, lungs, first: _Crescent, overlap: bool, scale: float) -> _Crescent:
    """Another region: on the same arc partly overlapping `first`, or clear of it."""
    sign = rng.choice([-1, 1])
    if overlap:
        candidate = _sample_crescent(rng, size, lungs, first.side, first.centre, scale)
        gap = rng.uniform(0.2, 0.7) * (first.half_arc + candidate.half_arc)
        return _Crescent(first.side, first.centre + sign * gap, candidate.half_arc, candidate.depth)
    if rng.random() < 0.5:
        return _sample_crescent(rng, size, lungs, -first.side, scale=scale)
    candidate = _sample_crescent(rng, size, lungs, first.side, first.centre, scale)
    gap = first.half_arc + candidate.half_arc + rng.uniform(0.15, 0.5)
    return _Crescent(first.side, first.centre + sign * gap, candidate.half_arc, candidate.depth)


def _rasterise(lung: _Lung, crescent: _Crescent, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The crescent's mask and its visceral pleural line (a thin ridge at the inner border)."""
    t = _wrapped(lung.phi - crescent.centre) / crescent.half_arc
    width = crescent.depth * np.clip(1 - t * t, 0, 1) ** _TAPER_POWER
    inner = lung.edge * (1 - width)
    mask = (lung.rho >= inner) & (np.abs(t) < 1) & lung.inside
    distance_px = (lung.rho - inner) * lung.pixel_scale
    sigma = max(0.6, size / 400)
    line = np.exp(-0.5 * (distance_px / sigma) ** 2) * (np.abs(t) < 1) * lung.inside
    return mask, line.astype(np.float32)


def _wrapped(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _lesion_fields(lungs, regions) -> tuple[np.ndarray, np.ndarray]:
    """Union of the lesion masks (float) and the brightest pleural line over all regions."""
    shape = lungs[0].rho.shape
    lesion = np.zeros(shape, np.float32)
    line = np.zeros(shape, np.float32)
    for mask, region_line in regions:
        lesion = np.maximum(lesion, mask)
        line = np.maximum(line, region_line)
    return lesion, line * (1 - lesion)  # the line lies on the lung side of the border
