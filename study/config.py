"""The typed study config: frozen dataclasses loaded from one YAML file.

Every key of the whole study is declared here, so later stages only add behaviour. Loading
checks every key, type and value and fails with one message naming the key (as a dotted path)
and what is allowed. Unknown keys are errors, with a spelling suggestion.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import yaml

from study.errors import CamstudyError, ConfigError, shown
from study.errors import require as _check
from study.models import LAYER_ARMS, cam_layers, specs_for
from study.recipes import PAPER_RECIPES, Recipe
from study.records import fingerprint
from study.selection import plan_selection

# --------------------------------------------------------------------------- schema

MAX_SEED = 2**32 - 1  # numpy's and torch's seedable range
MAX_COUNT = 10_000_000  # images: SIIM has 12,047
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SyntheticData:
    """Parameters of the synthetic SIIM-format generator (`camstudy synth`)."""

    n: int = 400  # number of labelled DICOMs
    size: int = 256  # DICOM width = height, pixels
    seed: int = 0
    positive_fraction: float = 0.5
    contrast: float = 0.5  # lesion contrast: 0 = invisible, 1 = obvious
    unlabelled: int = 3  # DICOMs written without a label row
    orphans: int = 2  # label rows written without a DICOM
    # multiplies every lesion's area: 1 = the real SIIM distribution (median 0.7% of the image);
    # the 64-px demo uses larger lesions so that networks at that size can see them
    lesion_scale: float = 1.0

    def __post_init__(self):
        _check(10 <= self.n <= 1_000_000, "data.synthetic.n", self.n, "an integer in [10, 1000000]")
        _check(64 <= self.size <= 4096, "data.synthetic.size", self.size, "an integer in [64, 4096]")
        _check(0 < self.positive_fraction < 1, "data.synthetic.positive_fraction",
               self.positive_fraction, "a fraction strictly between 0 and 1")
        _check(0 <= self.contrast <= 1, "data.synthetic.contrast", self.contrast, "a value in [0, 1]")
        _check(0 < self.lesion_scale <= 20, "data.synthetic.lesion_scale", self.lesion_scale, "a value in (0, 20]")
        for key in ("seed", "unlabelled", "orphans"):
            _check(0 <= getattr(self, key) <= MAX_COUNT, f"data.synthetic.{key}", getattr(self, key),
                   f"an integer in [0, {MAX_COUNT}]")


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels come from."""

    # synthetic: generate the stage-1 layout under <storage>/<study>/source, then read it
    # with the real stage-1 reader. siim-dicom / siim-png: read an existing download at root.
    source: Literal["synthetic", "siim-dicom", "siim-png"] = "synthetic"
    root: Optional[str] = None  # folder of the SIIM download (required unless synthetic)
    labels: Optional[str] = None  # label CSV (stage-1 train-rle.csv or stage-2 file); default: found under root
    strict: bool = False  # abort on unlabelled DICOMs or label rows without a DICOM
    dedupe_pixels: bool = False  # drop pixel-identical duplicate images (keeps the first id)
    synthetic: SyntheticData = field(default_factory=SyntheticData)

    def __post_init__(self):
        if self.source != "synthetic":
            _check(self.root is not None, "data.root", self.root,
                   f"the folder of your SIIM download (required when data.source is {self.source!r})")


@dataclass(frozen=True)
class SplitConfig:
    """Which images are used and how they are split (by image, stratified by label, seeded)."""

    seed: int = 0
    n_positive: Union[int, Literal["all"]] = "all"  # positive images to use
    n_negative: Union[int, Literal["match", "all"]] = "match"  # "match" = as many as positives
    n_val: int = 1000  # validation images, same positive share as the selection
    n_test: int = 1000  # test images, same positive share as the selection
    # exact: a request the data cannot satisfy is an error; max-available: shrink to what exists
    balance: Literal["exact", "max-available"] = "exact"

    def __post_init__(self):
        _check(0 <= self.seed <= MAX_SEED, "split.seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        for key in ("n_val", "n_test"):
            _check(2 <= getattr(self, key) <= MAX_COUNT, f"split.{key}", getattr(self, key),
                   f"an integer in [2, {MAX_COUNT}]")
        for key in ("n_positive", "n_negative"):
            value = getattr(self, key)
            if isinstance(value, int):
                _check(1 <= value <= MAX_COUNT, f"split.{key}", value, f"an integer in [1, {MAX_COUNT}] or a keyword")


@dataclass(frozen=True)
class PreprocessConfig:
    """Decode -> CLAHE -> resize -> per-image z-score (docs/STUDY.md §2)."""

    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tiles: int = 8  # tiles per side (8 -> an 8x8 grid)
    image_size: int = 224  # network input, pixels per side
    interpolation: Literal["area", "linear", "cubic"] = "area"
    zscore: bool = True
    channels: Literal[1, 3] = 3  # grey replicated to 3 channels for ImageNet models

    def __post_init__(self):
        _check(0 < self.clahe_clip_limit <= 1000, "preprocess.clahe_clip_limit", self.clahe_clip_limit,
               "a value in (0, 1000]")
        _check(1 <= self.clahe_tiles <= 64, "preprocess.clahe_tiles", self.clahe_tiles, "an integer in [1, 64]")
        # SIIM images are 1024 px; larger inputs only upsample them and multiply the cache size
        _check(16 <= self.image_size <= 1024, "preprocess.image_size", self.image_size, "an integer in [16, 1024]")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation, applied as batched tensor ops."""

    enabled: bool = True
    noise_std: float = 0.05  # additive Gaussian noise, in z-score units
    rotate_degrees: float = 10.0  # uniform in [-d, d]
    hflip_probability: float = 0.5
    brightness: float = 0.1  # additive shift, uniform in [-b, b] (z-score units)
    contrast: float = 0.1  # multiplicative factor, uniform in [1-c, 1+c]

    def __post_init__(self):
        _check(0 <= self.hflip_probability <= 1, "augment.hflip_probability",
               self.hflip_probability, "a probability in [0, 1]")
        for key, high in (("noise_std", 10), ("rotate_degrees", 180), ("brightness", 10), ("contrast", 1)):
            _check(0 <= getattr(self, key) <= high, f"augment.{key}", getattr(self, key), f"a value in [0, {high}]")


@dataclass(frozen=True)
class ExtraModel:
    """A model beyond the nine built-ins, declared in the config (no code change needed)."""

    timm_name: str
    family: str  # a key of `recipes`
    depth: int
    target_layer: str  # dotted path, e.g. "layer4.-1" or "blocks.-1.norm1"
    token_reshape: bool = False  # True for ViT-style token outputs
    pretrained_tag: Optional[str] = None
    stage_layers: tuple[str, ...] = ()  # every stage's output, shallow to deep (cam.layers: stages)
    matched_layer: Optional[str] = None  # the layer whose map is 1/16 of the input (cam.layers: matched)

    def __post_init__(self):
        _check(1 <= self.depth <= 10_000, "models.extra.*.depth", self.depth, "an integer in [1, 10000] (layers)")


@dataclass(frozen=True)
class ModelsConfig:
    """Which registry models are trained, and where their starting weights come from."""

    names: tuple[str, ...] = ("vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101",
                              "vit_small", "vit_base", "vit_large")
    # imagenet: timm pretrained weights (HF cache / HF_HUB_OFFLINE honoured, or weights_files);
    # random: random initialisation, an explicit choice and recorded as such
    init: Literal["imagenet", "random"] = "imagenet"
    weights_files: dict[str, str] = field(default_factory=dict)  # model -> local .safetensors/.pth
    extra: dict[str, ExtraModel] = field(default_factory=dict)

    def __post_init__(self):
        _check(len(self.names) >= 1, "models.names", self.names, "a non-empty list of model keys")
        _check(len(set(self.names)) == len(self.names), "models.names", self.names, "a list without duplicates")
        specs_for(self)  # every name is a built-in or a models.extra key (else training fails after prepare)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything about fitting that is not the per-family recipe."""

    seeds: tuple[int, ...] = (0,)
    batch_size: int = 32
    selection: Literal["val_auc", "val_loss", "last"] = "val_auc"  # which epoch's weights are kept
    threshold: float = 0.5  # on the softmax probability of the positive class
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # CNNs, on CUDA and CPU
    # Ray Train restarts of a crashed worker (it resumes from the last checkpoint); an error of
    # camstudy's own (a diverged loss, a bad setting) is never retried
    max_failures: int = 2

    def __post_init__(self):
        _check(0 <= self.max_failures <= 100, "training.max_failures", self.max_failures,
               "an integer in [0, 100] (restarts of a crashed worker; 0 = none)")
        _check(1 <= len(self.seeds) <= 1000 and all(0 <= seed <= MAX_SEED for seed in self.seeds),
               "training.seeds", self.seeds, f"a non-empty list of integers in [0, {MAX_SEED}]")
        _check(len(set(self.seeds)) == len(self.seeds), "training.seeds", self.seeds, "a list without duplicates")
        _check(1 <= self.batch_size <= 4096, "training.batch_size", self.batch_size, "an integer in [1, 4096]")
        _check(0 < self.threshold < 1, "training.threshold", self.threshold, "a value in (0, 1)")


# The CAM methods, stated once: what cam.methods accepts and what explain.cam implements (its METHODS)
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "scorecam", "eigencam", "rollout")


@dataclass(frozen=True)
class CamConfig:
    """Which heatmaps are computed and on which images (docs/STUDY.md §4)."""

    methods: tuple[Literal[CAM_METHODS], ...] = ("gradcam",)  # type: ignore[valid-type]
    # where maps are read (docs/STUDY.md §9): final = the paper's target layer (always computed);
    # stages = every stage's output; matched = the layer with a map 1/16 of the input (14x14 at 224 px)
    layers: tuple[Literal[LAYER_ARMS], ...] = ("final",)  # type: ignore[valid-type]
    images: Literal["positives", "true-positives"] = "positives"
    batch_size: int = 8
    sanity_randomized: bool = True  # also run on a weight-randomised copy (Adebayo et al. 2018)

    def __post_init__(self):
        _check(1 <= self.batch_size <= 4096, "cam.batch_size", self.batch_size, "an integer in [1, 4096]")
        _check(len(self.methods) >= 1, "cam.methods", self.methods, "a non-empty list of CAM methods")
        _check(len(set(self.methods)) == len(self.methods), "cam.methods", self.methods, "a list without duplicates")
        _check("final" in self.layers and len(set(self.layers)) == len(self.layers), "cam.layers", self.layers,
               "a list without duplicates that includes 'final' (the paper's layer, which every table reads)")


@dataclass(frozen=True)
class MetricsConfig:
    """Localisation-metric parameters (docs/STUDY.md §5)."""

    ehr_thresholds: int = 100  # n: thresholds k/n, k = 0..n
    inputiba_min_heat: float = 0.1
    inputiba_quantiles: int = 10  # q = 0, 1/10, ..., 1
    inputiba_cap: float = 0.99  # thresholds capped at cap * max(h)
    # iou_tuned / hit_tuned (docs/STUDY.md §9): the threshold t in {k/tuning_steps, k = 1..tuning_steps-1}
    # maximising mean IoU of {h >= t} on the validation positives; a hit is IoU >= hit_iou there
    tuning_steps: int = 20
    hit_iou: float = 0.1

    def __post_init__(self):
        _check(1 <= self.ehr_thresholds <= 10_000, "metrics.ehr_thresholds", self.ehr_thresholds,
               "an integer in [1, 10000]")
        _check(0 <= self.inputiba_min_heat < 1, "metrics.inputiba_min_heat", self.inputiba_min_heat, "a value in [0, 1)")
        _check(1 <= self.inputiba_quantiles <= 1000, "metrics.inputiba_quantiles", self.inputiba_quantiles,
               "an integer in [1, 1000]")
        _check(0 < self.inputiba_cap <= 1, "metrics.inputiba_cap", self.inputiba_cap, "a value in (0, 1]")
        _check(2 <= self.tuning_steps <= 1000, "metrics.tuning_steps", self.tuning_steps, "an integer in [2, 1000]")
        _check(0 < self.hit_iou <= 1, "metrics.hit_iou", self.hit_iou, "a value in (0, 1]")


@dataclass(frozen=True)
class BaselinesConfig:
    """The baseline ladder's maps that ignore the model (docs/STUDY.md §9), scored on the same images."""

    enabled: bool = True
    # image-only map: Sobel gradient magnitude of the preprocessed image, Gaussian-smoothed with
    # this sigma (a fraction of the image side: 4.5 px at 224 px), min-max normalised
    image_only_sigma: float = 0.02

    def __post_init__(self):
        _check(0 < self.image_only_sigma <= 0.5, "baselines.image_only_sigma", self.image_only_sigma,
               "a fraction of the image side in (0, 0.5]")


@dataclass(frozen=True)
class SanityConfig:
    """Are the maps themselves reliable? (docs/STUDY.md §10; the full weight randomisation is
    `cam.sanity_randomized`.)"""

    # cascading model randomisation (Adebayo et al. 2018): re-initialise the trained network
    # from the head down, one stage at a time, and read the paper's layer after each step
    cascade: bool = True
    # data randomisation: one extra run per architecture trained on permuted training labels
    label_permutation: bool = False
    permutation_seed: int = 0  # that run's seed (weights, batches) and the seed of the permutation
    pass_line_pairs: int = 50  # Arun et al. 2021: mean SSIM of trained maps of this many random image pairs

    def __post_init__(self):
        _check(0 <= self.permutation_seed <= MAX_SEED, "sanity.permutation_seed", self.permutation_seed,
               f"an integer in [0, {MAX_SEED}]")
        _check(2 <= self.pass_line_pairs <= 100_000, "sanity.pass_line_pairs", self.pass_line_pairs,
               "an integer in [2, 100000]")


# Faithfulness and robustness (docs/STUDY.md §11), stated once: the config's defaults and what
# `explain.faithfulness` implements (it takes these from here)
ROAD_STEPS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)  # % of the pixels removed per step
IMPUTATIONS = ("road", "blur", "zero")  # ROAD's noisy linear imputation; deletion/insertion fills
SENSITIVITY_N, SENSITIVITY_RADIUS = 10, 0.02  # perturbations; radius x the image's intensity range


def _check_images(key: str, value) -> None:
    if isinstance(value, int):
        _check(1 <= value <= MAX_COUNT, key, value, f"an integer in [1, {MAX_COUNT}] (test images per run) or 'all'")


@dataclass(frozen=True)
class FaithfulnessConfig:
    """ROAD (Rong et al. 2022) of every scored map and of the controls (docs/STUDY.md §11)."""

    enabled: bool = True
    # the layer arms (as cam.layers) whose trained maps are scored; 'final' (the paper's layer, where the
    # weight-randomised twin and the controls are scored too) is always among them
    layers: tuple[Literal[LAYER_ARMS], ...] = ("final",)  # type: ignore[valid-type]
    steps: tuple[float, ...] = ROAD_STEPS  # k: the top (MoRF) or bottom (LeRF) k% of a map's pixels removed
    imputation: Literal[IMPUTATIONS] = "road"  # type: ignore[valid-type]  # blur, zero: deletion/insertion
    # the test images of each run scored: all, or the N with the lowest seeded rank (explain.road.subset;
    # the same images in every run that maps them), to bound the cost (ROAD's forwards) of a small study
    images: Union[int, Literal["all"]] = "all"

    def __post_init__(self):
        _check_images("faithfulness.images", self.images)
        _check("final" in self.layers and len(set(self.layers)) == len(self.layers), "faithfulness.layers",
               self.layers, "a list without duplicates that includes 'final' (the paper's layer, where the "
               "controls are scored)")
        _check(1 <= len(self.steps) <= 99 and all(0 < k < 100 for k in self.steps), "faithfulness.steps",
               self.steps, "a non-empty list of percentages strictly between 0 and 100, e.g. [10, 20, ..., 90]")
        _check(all(a < b for a, b in zip(self.steps, self.steps[1:])), "faithfulness.steps", self.steps,
               "percentages in increasing order without duplicates (each is one column of the per-step lists)")


@dataclass(frozen=True)
class RobustnessConfig:
    """Max-sensitivity (Yeh et al. 2019) of the maps at the paper's layer (docs/STUDY.md §11)."""

    enabled: bool = True
    n: int = SENSITIVITY_N  # seeded perturbations per image
    # L-infinity radius of the uniform noise, as a fraction of each image's intensity range (preprocessed scale)
    radius: float = SENSITIVITY_RADIUS
    images: Union[int, Literal["all"]] = "all"  # as faithfulness.images

    def __post_init__(self):
        _check_images("robustness.images", self.images)
        _check(1 <= self.n <= 1000, "robustness.n", self.n, "an integer in [1, 1000] (perturbations per image)")
        _check(0 < self.radius <= 1, "robustness.radius", self.radius,
               "a fraction of the image's intensity range in (0, 1]")


@dataclass(frozen=True)
class TrialOutcome:
    """One `camstudy tune` trial: its recipe and how far it got."""

    lr: float
    weight_decay: float
    best_val_auc: float
    epochs: int


@dataclass(frozen=True)
class FamilyTuning:
    model: str  # the family's model the trials trained
    best_val_auc: float
    trials: tuple[TrialOutcome, ...] = ()


@dataclass(frozen=True)
class TuningRecord:
    """How the recipes were chosen: empty when as configured; written by `camstudy tune` into its
    recipe file beside the recipes, and read with them by `--recipes FILE` (the report shows it)."""

    families: dict[str, str] = field(default_factory=dict)  # tuned family -> the model it was tuned on
    method: str = ""
    trials: int = 0
    file: str = ""
    outcomes: dict[str, FamilyTuning] = field(default_factory=dict)  # per family: every trial's outcome

    def __post_init__(self):
        _check(0 <= self.trials <= 1_000_000, "tuning.trials", self.trials, "an integer in [0, 1000000]")


@dataclass(frozen=True)
class StatisticsConfig:
    alpha: float = 0.05
    # TOST equivalence margin for pairs that do not differ, in each metric's own units (docs/STUDY.md §10)
    equivalence_margin: float = 0.02
    power: float = 0.8  # the power at which the minimum detectable difference is stated
    bootstrap_replicates: int = 1000  # hierarchical bootstrap of model-level CIs (seeds, then images)
    bootstrap_seed: int = 0

    def __post_init__(self):
        _check(0 < self.alpha < 1, "statistics.alpha", self.alpha, "a value in (0, 1)")
        _check(0 < self.equivalence_margin <= 10, "statistics.equivalence_margin", self.equivalence_margin,
               "a positive margin in the metric's units, at most 10")
        _check(0 < self.power < 1, "statistics.power", self.power, "a value in (0, 1)")
        _check(1000 <= self.bootstrap_replicates <= 1_000_000, "statistics.bootstrap_replicates",
               self.bootstrap_replicates, "an integer in [1000, 1000000] (docs/STUDY.md §10: at least 1,000)")
        _check(0 <= self.bootstrap_seed <= MAX_SEED, "statistics.bootstrap_seed", self.bootstrap_seed,
               f"an integer in [0, {MAX_SEED}]")


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None  # None -> sqlite:///<storage>/<study>/mlflow.db (absolute)
    experiment: str = "camstudy"


@dataclass(frozen=True)
class ResourcesConfig:
    """How work is placed on the Ray cluster."""

    # auto: on a cluster with GPUs each run asks for the share of one GPU its model needs (memory at
    # this batch and image size; measured once a run has trained: orchestrator.schedule), big and
    # long runs whole GPUs, packed longest first; without GPUs, 0. A number: that for every run.
    gpus_per_run: Union[float, Literal["auto"]] = "auto"
    gpu_memory_gb: float = 80.0  # memory of one GPU of the cluster (an H100: 80), for the shares
    workers_per_run: int = 1  # >1 = DDP inside one run: training.batch_size is split across the workers
    cpus_per_worker: float = 1.0
    max_concurrent_runs: Union[int, Literal["auto"]] = "auto"  # auto: GPUs, or what the CPUs fit
    # Ray Data tasks in flight for preprocessing; auto: as many as the CPUs; 0: no Ray, a plain
    # in-process loop (the reference path, for debugging)
    prepare_actors: Union[int, Literal["auto"]] = "auto"
    torch_threads: Union[int, Literal["auto"]] = "auto"
    # extra custom Ray resources per model, e.g. {vit_large: {large_gpu: 1}} to place ViT-L on
    # the cluster.yaml node type that advertises `large_gpu`
    model_resources: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        _check(1 <= self.workers_per_run <= 1024, "resources.workers_per_run", self.workers_per_run,
               "an integer in [1, 1024] (1 = one process per run; k > 1 = DDP across k Ray Train workers)")
        _check(0 < self.cpus_per_worker <= 1024, "resources.cpus_per_worker", self.cpus_per_worker,
               "a number of CPUs in (0, 1024]")
        _check(1 <= self.gpu_memory_gb <= 10_000, "resources.gpu_memory_gb", self.gpu_memory_gb,
               "the memory of one GPU in GB, in [1, 10000]")
        if self.gpus_per_run != "auto":
            _check(0 <= self.gpus_per_run <= 64, "resources.gpus_per_run", self.gpus_per_run,
                   "a number of GPUs in [0, 64] (fractions share a GPU) or 'auto'")
        for key, low in (("max_concurrent_runs", 1), ("prepare_actors", 0), ("torch_threads", 1)):
            value = getattr(self, key)
            if value != "auto":
                _check(low <= value <= 1024, f"resources.{key}", value, f"an integer in [{low}, 1024] or 'auto'")
        for model, amounts in self.model_resources.items():
            for name, amount in amounts.items():
                _check(0 <= amount <= 1024, f"resources.model_resources.{model}.{name}", amount,
                       "an amount in [0, 1024]")


@dataclass(frozen=True)
class StudyConfig:
    """The whole study. `storage`/`study` locate the study store."""

    study: str = "demo"
    storage: str = "studies"  # a local or shared (NFS) folder, made absolute; or s3://bucket/prefix
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    recipes: dict[str, Recipe] = field(default_factory=lambda: dict(PAPER_RECIPES))
    tuning: TuningRecord = field(default_factory=TuningRecord)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    sanity: SanityConfig = field(default_factory=SanityConfig)
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self):
        _check(len(self.study) <= 100 and _FOLDER_NAME.fullmatch(self.study) is not None, "study", self.study,
               "a name of up to 100 ASCII letters, digits, '-' and '_' (it becomes a folder name)")
        workers = self.resources.workers_per_run
        # the global batch stays training.batch_size whatever the worker count (comparable runs),
        # so it must split evenly into one equal share per worker
        _check(self.training.batch_size % workers == 0, "training.batch_size", self.training.batch_size,
               f"a multiple of resources.workers_per_run ({workers}): each worker trains on "
               f"batch_size / workers_per_run images of every batch")
        for name, extra in self.models.extra.items():
            _check(extra.family in self.recipes, f"models.extra.{name}.family", extra.family,
                   f"one of the recipe families {sorted(self.recipes)}")
        # what explain would refuse after every model has trained, refused before anything runs
        specs = specs_for(self.models)
        for spec in specs:
            cam_layers(spec, self.cam.layers)  # an arm the model declares no layers for
        outside = [arm for arm in self.faithfulness.layers if arm not in self.cam.layers]
        if outside:
            raise ConfigError(f"faithfulness.layers: {', '.join(map(repr, outside))} not in cam.layers "
                              f"{list(self.cam.layers)}: ROAD scores maps the explain stage makes; add the arm to "
                              "cam.layers or drop it from faithfulness.layers")
        cnns = [spec.name for spec in specs if not spec.token_reshape]  # token_reshape: a ViT's attention blocks
        if "rollout" in self.cam.methods and cnns:
            raise ConfigError(f"cam.methods: 'rollout' reads attention blocks, which only ViTs have, but the study "
                              f"trains the CNNs {', '.join(cnns)}; drop 'rollout' from cam.methods or train only ViTs")

    @property
    def study_dir(self) -> str:
        """The study store root: <storage>/<study>."""
        return f"{self.storage.rstrip('/')}/{self.study}"

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def hash(self, *sections: str) -> str:
        """A short stable hash of the named top-level sections (all when none are named)."""
        plain = self.to_dict()
        return fingerprint({key: plain[key] for key in (sections or plain)})


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                given_as: dict[str, str] | None = None,
                checks: Sequence[Callable[[StudyConfig], None]] = ()) -> StudyConfig:
    """Read a YAML config, apply dotted-key overrides, validate, and resolve local storage.

    A config that cannot run is refused here, before any command creates the study folder, its
    lock or an MLflow run: besides every key's type and range, unknown models, CAM layer arms a
    model has no layers for, rollout on a CNN, and a split the synthetic data cannot give.
    `checks` run on the built config inside the same error framing: the commands that read the
    images pass `training.source.check_data_source` (a real data root); it is not the default
    because configs whose data root exists only on the cluster are loaded elsewhere (tests,
    benches, the submitting machine), and because it reads the data, which this floor does not.

    An error is prefixed with what caused it: the override that set a key the message names
    (`given_as[key]`, how the user wrote it, e.g. `--set preprocess.image_size=big`), else the file.
    """
    path = Path(path)
    overrides = overrides or {}
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass a YAML file such as configs/demo.yaml")
    raw = read_yaml(_config_text(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in overrides.items():
        _set_dotted(raw, dotted, value)
    try:
        config = build(StudyConfig, raw, "")
        _refuse_impossible_synthetic_split(config)
        for check in checks:
            check(config)
        return resolve_storage(config, base=Path.cwd())
    except ConfigError as error:
        raise ConfigError(f"{_cause(str(error), path, overrides, given_as or {})}: {error}") from None


def _cause(message: str, path: Path, overrides: dict[str, Any], given_as: dict[str, str]) -> str:
    """The overrides whose key `message` names (it starts with the key; a dotted key may also be
    named further on, as in a cross-key rule), as the user gave them; else the config file."""
    causes = [given_as.get(key, f"override {key}={shown(value)}") for key, value in overrides.items()
              if re.match(rf"{re.escape(key)}(?![\w])", message)
              or ("." in key and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message))]
    return " ".join(dict.fromkeys(causes)) or str(path)


def _refuse_impossible_synthetic_split(config: StudyConfig) -> None:
    """Synthetic data's label counts follow from data.synthetic, so the split prepare would plan
    is planned now (study.selection, the same rule prepare follows) and a request it cannot meet is refused at
    load. Real data is checked by `check_data_source`, as far as its label file allows."""
    if config.data.source != "synthetic":
        return
    synthetic = config.data.synthetic
    positive = round(synthetic.n * synthetic.positive_fraction)  # as training.synth._plan draws them
    try:
        plan_selection(positive, synthetic.n - positive, config.split)
    except CamstudyError as error:  # a DataError when one label gets no image at all
        raise ConfigError(f"{error} (synthetic data: data.synthetic.n = {synthetic.n} labelled images, {positive} "
                          f"positive at data.synthetic.positive_fraction = {synthetic.positive_fraction}; a larger "
                          "data.synthetic.n also fixes it)") from None


# Set by `ray job submit` in the job's driver: its working folder is Ray's temporary copy of
# --working-dir, deleted with the job
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


OBJECT_STORES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # schemes pyarrow.fs opens


def resolve_storage(config: StudyConfig, base: Path) -> StudyConfig:
    """Make the storage path absolute so Ray workers and MLflow agree on it; an object-store URI
    (`s3://bucket/prefix`, any scheme of OBJECT_STORES) is kept as it is (study.objectstore).

    Refused: another URI scheme, a path that is a file, and under `ray job submit` a relative
    path (it would resolve inside the job's temporary working folder, so the study would vanish
    with the job and never resume)."""
    storage = config.storage
    if "://" in storage:
        scheme, _, rest = storage.partition("://")
        if scheme not in OBJECT_STORES or not rest.strip("/"):
            raise ConfigError(f"storage: {storage!r} is not an object store camstudy can use; give a folder, or a "
                              f"URI with a bucket of one of the schemes {', '.join(OBJECT_STORES)} "
                              "(e.g. s3://my-bucket/studies)")
        return dataclasses.replace(config, storage=storage.rstrip("/"))
    if not Path(storage).is_absolute() and os.environ.get(RAY_JOB_ENV):
        raise ConfigError(f"storage: {storage!r} is relative, and under `ray job submit` it would resolve inside "
                          "the job's temporary working folder (deleted with the job); give an absolute path "
                          "on storage every node shares, e.g. --set storage=/mnt/shared/studies")
    resolved = (base / storage).resolve()
    _check_writable_folder(resolved)
    return dataclasses.replace(config, storage=str(resolved))


def _check_writable_folder(folder: Path) -> None:
    """`folder`, or the nearest part of it that exists, is a folder this user can write in."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise ConfigError(f"storage: {folder} {what}, not a folder; point storage at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage: {existing} is not writable by this user; point storage at a folder "
                          "you can write in, or fix its permissions")


def _config_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror}); check the path and its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start} is {data[error.start]:#04x}); "
                          "save the config as UTF-8") from None


def read_yaml(text: str, source: str) -> Any:
    """One YAML document, or a ConfigError naming `source`, the line and column and the problem.
    Invalid dates (`2024-13-45`) and documents nested too deeply count as invalid YAML."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context or "invalid syntax"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    except (yaml.YAMLError, ValueError, OverflowError, TypeError) as error:
        raise ConfigError(f"{source}: not valid YAML: {str(error).splitlines()[0][:200]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def recipe_overrides(path: str | Path) -> dict[str, Any]:
    """The dotted-key overrides of a `camstudy tune` recipe file: each family's recipe replaces the
    config's (`recipes.<family>`), and its `tuning` record says how they were chosen."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--recipes {path}: file not found; write one with `camstudy tune CONFIG --out {path}`")
    fragment = read_yaml(_config_text(path), str(path))
    if not isinstance(fragment, dict) or not isinstance(fragment.get("recipes"), dict) or set(fragment) - {"recipes",
                                                                                                          "tuning"}:
        raise ConfigError(f"{path}: not a recipe file: expected the sections 'recipes' (family -> recipe) and "
                          "'tuning', as `camstudy tune` writes them")
    _check_keys(fragment["recipes"], f"{path}: recipes")
    overrides: dict[str, Any] = {f"recipes.{family}": recipe for family, recipe in fragment["recipes"].items()}
    if "tuning" in fragment:
        overrides["tuning"] = fragment["tuning"]
    return overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` from the command line; the value is parsed as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)}: expected KEY=VALUE, e.g. training.seeds=[0,1,2]")
    key, value = text.split("=", 1)
    key = key.strip()
    if len(key) > 200 or not _DOTTED_KEY.fullmatch(key):
        raise ConfigError(f"override {shown(text)}: {shown(key)} is not a dotted config key such as training.seeds")
    return key, read_yaml(value, f"override {key}")


_DOTTED_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def dump_config(config: StudyConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def build(cls: Any, value: Any, where: str) -> Any:
    """Convert `value` into an instance of the annotated type `cls`, naming `where` on error."""
    if dataclasses.is_dataclass(cls):
        return _build_dataclass(cls, value, where)
    origin = typing.get_origin(cls)
    if origin is Literal:
        return _build_literal(cls, value, where)
    if origin in (Union, types.UnionType):
        return _build_union(cls, value, where)
    if origin is tuple:
        item_type = typing.get_args(cls)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        return tuple(build(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        _, item_type = typing.get_args(cls)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        _check_keys(value, where)
        return {k: build(item_type, v, f"{where}.{k}") for k, v in value.items()}
    return _build_scalar(cls, value, where)


def _build_dataclass(cls: Any, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {shown(value)}")
    _check_keys(value, where)
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{_join(where, key)}: unknown key{_suggest(key, allowed)}; allowed keys: {', '.join(allowed)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in value:
            raise ConfigError(f"{_join(where, key)}: missing required key")
    kwargs = {key: build(hints[key], item, _join(where, key)) for key, item in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if where and "*" in str(error):
            raise ConfigError(str(error).replace("*", where.rsplit(".", 1)[-1], 1)) from None
        raise


def _build_literal(cls: Any, value: Any, where: str) -> Any:
    allowed = typing.get_args(cls)
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{where}: {shown(value)} is not allowed; use one of {', '.join(repr(a) for a in allowed)}")
    return value


def _build_union(cls: Any, value: Any, where: str) -> Any:
    options = typing.get_args(cls)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: a value is required (got null)")
    for option in options:
        if option is type(None):
            continue
        try:
            return build(option, value, where)
        except ConfigError:
            pass
    allowed = " or ".join(_describe(option) for option in options if option is not type(None))
    raise ConfigError(f"{where}: {shown(value)} is not valid; use {allowed}")


def _describe(option: Any) -> str:
    """What one member of a Union accepts, for error messages."""
    if typing.get_origin(option) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(option))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(option, getattr(option, "__name__", repr(option)))


def _build_scalar(cls: Any, value: Any, where: str) -> Any:
    if cls is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_given(value)}")
        return value
    if cls is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_given(value)}")
        return value
    if cls is float:
        if isinstance(value, str) and len(value) < 100 and _DECIMAL.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 and 1.0e6 (no dot, or no sign) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_given(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}")
        return float(value)
    if cls is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_given(value)}")
        if not value.isprintable():
            raise ConfigError(f"{where}: {shown(value)} holds control characters; use printable text")
        return value
    raise TypeError(f"config schema uses an unsupported type {cls!r} at {where}")


_DECIMAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$", re.ASCII)


def _given(value: Any) -> str:
    """A wrong value as the user wrote it, with a hint where YAML read it as something else."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()} (YAML reads an unquoted date as a date: quote it)"
    return shown(value)


def _check_keys(mapping: dict, where: str) -> None:
    """Keys are strings; YAML also makes integers, booleans, dates and nulls of unquoted keys."""
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"{where or 'config'}: the key {shown(key)} is a {type(key).__name__}, not a "
                              "name; config keys are names (quote it if it is meant as one)")
        if len(key) > 100 or not key.isprintable():
            raise ConfigError(f"{where or 'config'}: the key {shown(key)} is not a config key name "
                              "(too long, or holds control characters)")


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        if node.get(part) is None:  # absent, or an empty section (`data:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
    node[last] = value


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value
