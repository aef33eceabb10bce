"""The prepare stage's parts: selection and split, the manifest, the preprocessing pass, the report.

Selection and split (STUDY.md §1) are by image, stratified by label and seeded. Each random
draw has its own stream (`default_rng([seed, stream])`), so for one seed the positives drawn do
not depend on the negative count, and the test set is taken before validation, so changing
`n_val` leaves the test set unchanged.

The preprocessing pass maps one batch function over the selected rows, either with Ray Data
(`workers` "auto" or a number of tasks) or in a plain in-process loop (`workers` 0: the
reference path, used by the bench and for debugging). Both use the same functions and run
OpenCV single-threaded, so their outputs are identical and a timing comparison is fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Union

import cv2
import numpy as np
import pandas as pd

from training import rle
from training.atomic import write_atomic
from training.data import read_image
from training.errors import CamstudyError, ConfigError, DataError
from training.preprocess import preprocess_image, resize_mask
from training.ray_data import without_budget_backpressure

if TYPE_CHECKING:  # typing only: `training` does not depend on `orchestrator` at run time
    from training.config import PreprocessConfig, SplitConfig

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["image_id", "split", "label", "mask_rle", "mask_fraction", "path", "height",
                    "width", "content_hash"]
QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)
BATCH_SIZE = 16  # images per Ray Data block and batch: ~1.6 MB of 224-px float16 output
BLOCKS_PER_TASK = 4  # Ray Data blocks per task slot: few, long tasks with a short tail
Workers = Union[int, Literal["auto"]]

# random streams of one seed (never reorder: a stream's number fixes its draws)
_PICK_POSITIVE, _PICK_NEGATIVE, _SPLIT_POSITIVE, _SPLIT_NEGATIVE = range(4)


# --------------------------------------------------------------------------- selection and split


@dataclass(frozen=True)
class Selection:
    """How many images of each label are used and where they go."""

    n_positive: int
    n_negative: int
    val_positive: int
    val_negative: int
    test_positive: int
    test_negative: int
    rule: str  # the selection rule actually used, in words
    notes: tuple[str, ...] = ()  # what `balance: max-available` shrank

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        """split -> (positives, negatives)."""
        return {
            "train": (self.n_positive - self.val_positive - self.test_positive,
                      self.n_negative - self.val_negative - self.test_negative),
            "val": (self.val_positive, self.val_negative),
            "test": (self.test_positive, self.test_negative),
        }


def plan_selection(available_positive: int, available_negative: int, cfg: SplitConfig) -> Selection:
    """Decide the counts; a request the data cannot satisfy is a ConfigError saying what exists."""
    if available_positive == 0 or available_negative == 0:
        raise DataError(f"the labelled images are {available_positive} positive and {available_negative} "
                        "negative; both labels are needed to train and evaluate a classifier")
    notes: list[str] = []
    n_pos = _want_positive(available_positive, available_negative, cfg, notes)
    n_pos, n_neg = _want_negative(n_pos, available_positive, available_negative, cfg, notes)
    total = n_pos + n_neg
    if cfg.n_val + cfg.n_test >= total:
        raise ConfigError(
            f"split.n_val + split.n_test = {cfg.n_val} + {cfg.n_test} = {cfg.n_val + cfg.n_test} leaves no "
            f"training images from a selection of {total} ({n_pos} positive, {n_neg} negative; the data "
            f"has {available_positive} positive and {available_negative} negative); lower split.n_val and "
            "split.n_test, or select more images (split.n_positive / split.n_negative)")
    val_pos, test_pos = _share(cfg.n_val, n_pos, n_neg), _share(cfg.n_test, n_pos, n_neg)
    val_neg, test_neg = cfg.n_val - val_pos, cfg.n_test - test_pos
    if val_pos + test_pos >= n_pos or val_neg + test_neg >= n_neg:
        raise ConfigError(
            f"split.n_val/split.n_test ({cfg.n_val}/{cfg.n_test}) take {val_pos + test_pos} of the {n_pos} "
            f"positive and {val_neg + test_neg} of the {n_neg} negative images, leaving a training label "
            "empty; lower split.n_val and split.n_test")
    rule = (f"n_positive={cfg.n_positive} -> {n_pos} of {available_positive} positive; "
            f"n_negative={cfg.n_negative} -> {n_neg} of {available_negative} negative; "
            f"balance={cfg.balance}; seed={cfg.seed}; test {cfg.n_test} and val {cfg.n_val} "
            f"at the selection's positive share ({n_pos / total:.1%}), the rest train")
    return Selection(n_pos, n_neg, val_pos, val_neg, test_pos, test_neg, rule, tuple(notes))


def select_and_split(images: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The selected rows of `images` (image_id, label 0/1, ...) with a `split` column, by image_id."""
    return apply_selection(images, plan_selection(*available(images), cfg), cfg.seed)


def available(images: pd.DataFrame) -> tuple[int, int]:
    """(positive, negative) image counts; one row per image is required."""
    duplicated = images["image_id"][images["image_id"].duplicated()]
    if not duplicated.empty:
        raise DataError(f"{len(duplicated)} image ids occur in more than one row (first: "
                        f"{duplicated.iloc[0]!r}); the manifest needs one row per image")
    positive = int((images["label"] == 1).sum())
    return positive, len(images) - positive


def apply_selection(images: pd.DataFrame, selection: Selection, seed: int) -> pd.DataFrame:
    ordered = images.sort_values("image_id", kind="stable")
    parts = []
    for label, n, pick, split_stream, (test_n, val_n) in (
        (1, selection.n_positive, _PICK_POSITIVE, _SPLIT_POSITIVE,
         (selection.test_positive, selection.val_positive)),
        (0, selection.n_negative, _PICK_NEGATIVE, _SPLIT_NEGATIVE,
         (selection.test_negative, selection.val_negative)),
    ):
        pool = ordered[ordered["label"] == label]
        chosen = pool.iloc[_permutation(len(pool), seed, pick)[:n]].sort_values("image_id", kind="stable")
        split = np.full(n, "train", dtype=object)
        order = _permutation(n, seed, split_stream)
        split[order[:test_n]] = "test"
        split[order[test_n:test_n + val_n]] = "val"
        parts.append(chosen.assign(split=split))
    return pd.concat(parts).sort_values("image_id", kind="stable").reset_index(drop=True)


def _want_positive(avail_pos: int, avail_neg: int, cfg: SplitConfig, notes: list[str]) -> int:
    if cfg.n_positive == "all" or cfg.n_positive <= avail_pos:
        return avail_pos if cfg.n_positive == "all" else cfg.n_positive
    if cfg.balance == "exact":
        raise ConfigError(
            f"split.n_positive: {cfg.n_positive} positive images requested, but the data has "
            f"{avail_pos} unique positive images (and {avail_neg} negative); lower split.n_positive "
            f"(at most {avail_pos}, or 'all') or set split.balance: max-available to use what exists")
    notes.append(f"split.n_positive: {cfg.n_positive} requested, {avail_pos} exist; using {avail_pos} "
                 "(balance: max-available)")
    return avail_pos


def _want_negative(n_pos: int, avail_pos: int, avail_neg: int, cfg: SplitConfig,
                   notes: list[str]) -> tuple[int, int]:
    wanted = {"all": avail_neg, "match": n_pos}.get(cfg.n_negative, cfg.n_negative)  # type: ignore[arg-type]
    if wanted <= avail_neg:
        return n_pos, wanted
    what = ("'match' needs as many negative images as positives" if cfg.n_negative == "match"
            else f"{wanted} negative images requested")
    if cfg.balance == "exact":
        remedy = ("lower split.n_positive, give split.n_negative a number" if cfg.n_negative == "match"
                  else "lower split.n_negative")
        raise ConfigError(
            f"split.n_negative: {what} ({wanted}), but the data has {avail_neg} negative images (and "
            f"{avail_pos} positive); {remedy} (at most {avail_neg}), or set split.balance: max-available "
            "to use what exists")
    if cfg.n_negative == "match":  # keep the balance: both labels shrink to the smaller count
        notes.append(f"split.n_negative: 'match' needs {wanted}, {avail_neg} exist; using {avail_neg} "
                     f"of each label (balance: max-available)")
        return avail_neg, avail_neg
    notes.append(f"split.n_negative: {wanted} requested, {avail_neg} exist; using {avail_neg} "
                 "(balance: max-available)")
    return n_pos, avail_neg


def _share(n: int, n_pos: int, n_neg: int) -> int:
    """Positives among `n` at the selection's positive share; at least one of each label (n >= 2)."""
    k = int(np.floor(n * n_pos / (n_pos + n_neg) + 0.5))
    return min(max(k, 1), n - 1)


def _permutation(n: int, seed: int, stream: int) -> np.ndarray:
    return np.random.default_rng([seed, stream]).permutation(n)


# --------------------------------------------------------------------------- preprocessing pass


def process_batch(batch: pd.DataFrame, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Decode, preprocess and hash a batch of manifest rows (image_id, path, mask_rle, height, width).

    The function every worker runs; plain NumPy, no Ray. Masks are the union of the image's RLE
    rows, decoded at native size; `mask_fraction` is measured there, before resizing.
    """
    out: dict[str, list] = {key: [] for key in ("image_id", "image", "mask", "mask_fraction",
                                                 "content_hash", "height", "width")}
    for row in batch.itertuples(index=False):
        pixels = read_image(row.path)
        height, width = _native_size(row, pixels.shape)
        mask = union_mask(row.mask_rle, height, width, where=f"{row.path} (image {row.image_id})")
        out["image_id"].append(row.image_id)
        out["image"].append(preprocess_image(pixels, cfg))
        out["mask"].append(resize_mask(mask, cfg.image_size))
        out["mask_fraction"].append(float(mask.mean()))
        out["content_hash"].append(file_sha256(row.path))
        out["height"].append(height)
        out["width"].append(width)
    return {key: np.stack(values) if key in ("image", "mask") else np.asarray(values)
            for key, values in out.items()}


def pixel_hash_batch(batch: pd.DataFrame) -> dict[str, np.ndarray]:
    """sha256 of the decoded pixels (dtype, shape and values), for `data.dedupe_pixels`."""
    hashes = []
    for path in batch["path"]:
        pixels = np.ascontiguousarray(read_image(path))
        digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode())
        digest.update(pixels.tobytes())
        hashes.append(digest.hexdigest())
    return {"image_id": batch["image_id"].to_numpy(), "pixel_hash": np.asarray(hashes)}


def union_mask(mask_rle: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """The logical OR of an image's RLE rows (one string or a sequence of strings) at (height, width)."""
    strings = [mask_rle] if isinstance(mask_rle, str) else list(mask_rle)
    mask = np.zeros((height, width), dtype=bool)
    for text in strings:
        try:
            mask |= rle.decode(text, height, width)
        except ValueError as error:
            raise DataError(f"{where}: bad mask RLE: {error}") from None
    return mask


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def map_rows(rows: pd.DataFrame, fn: Callable[..., dict[str, np.ndarray]], workers: Workers,
             label: str, **fn_kwargs: Any) -> dict[str, np.ndarray]:
    """Apply a batch function to every row and return its columns in the order of `rows`.

    `workers` 0 runs a plain loop in this process; "auto" or k > 0 runs Ray Data tasks (k at
    most in flight), each reading its files by path. OpenCV is single-threaded on both paths.
    """
    if rows.empty:
        raise ValueError(f"map_rows({label}): no rows")
    start = time.perf_counter()
    if workers == 0:
        with opencv_threads(1):
            parts = _map_serial(rows, fn, label, fn_kwargs)
    else:
        parts = _map_ray(rows, fn, workers, label, fn_kwargs)
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    position = pd.Series(np.arange(len(columns["image_id"])), index=columns["image_id"])
    take = position.loc[rows["image_id"].to_numpy()].to_numpy()  # Ray Data does not keep row order
    elapsed = time.perf_counter() - start
    how = "in-process loop" if workers == 0 else f"Ray Data ({workers} tasks)"
    print(f"prepare: {label}: {len(rows)} images in {elapsed:.1f} s ({len(rows) / elapsed:.1f} img/s, {how})")
    return {key: values[take] for key, values in columns.items()}


@contextlib.contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """Run the block with OpenCV limited to `n` threads (process-global), then restore it."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


class _Progress:
    """A line on stderr at every tenth of the work (Ray Data's bar only shows on a terminal)."""

    def __init__(self, label: str, total: int, show: bool = True):
        self.label, self.total, self.show, self.done, self.shown = label, total, show, 0, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.show and self.done - self.shown >= max(1, self.total // 10) and self.done < self.total:
            print(f"prepare: {self.label}: {self.done}/{self.total}", file=sys.stderr)
            self.shown = self.done


def _map_serial(rows: pd.DataFrame, fn: Callable, label: str, fn_kwargs: dict) -> list[dict]:
    parts, progress = [], _Progress(label, len(rows))
    for start in range(0, len(rows), BATCH_SIZE):
        parts.append(fn(rows.iloc[start:start + BATCH_SIZE], **fn_kwargs))
        progress.advance(len(parts[-1]["image_id"]))
    return parts


def _map_ray(rows: pd.DataFrame, fn: Callable, workers: Workers, label: str, fn_kwargs: dict) -> list[dict]:
    import ray.data
    from ray.exceptions import RayTaskError

    context = ray.data.DataContext.get_current()
    # a worker's DataError should reach the driver as itself, not wrapped in UserCodeException
    context.raise_original_map_exception = True
    parallel = int(ray.cluster_resources().get("CPU", 1)) if workers == "auto" else int(workers)
    step = _block_rows(len(rows), parallel)
    blocks = [rows.iloc[i:i + step] for i in range(0, len(rows), step)]
    compute = None if workers == "auto" else ray.data.TaskPoolStrategy(size=parallel)
    parts, progress = [], _Progress(label, len(rows), show=not context.enable_progress_bars)
    try:
        with without_budget_backpressure(context):  # a Dataset copies the context it is made in
            dataset = ray.data.from_pandas(blocks).map_batches(
                _single_threaded, batch_size=min(step, BATCH_SIZE), batch_format="pandas",
                compute=compute, fn_args=(fn,), fn_kwargs=fn_kwargs)
            for part in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                parts.append(part)
                progress.advance(len(part["image_id"]))
        return parts
    except RayTaskError as error:
        if isinstance(error.cause, CamstudyError):
            raise error.cause from None  # its message names the file and the remedy
        raise


def _block_rows(n_rows: int, parallel: int) -> int:
    """Rows per Ray Data block, hence per task: BLOCKS_PER_TASK blocks for each task slot.

    Every task start costs scheduling and argument transfer, so tasks are few and long; a task still works through its
    block BATCH_SIZE rows at a time and streams each batch's output to the driver. A few blocks
    per slot keep the tail short when one block runs slower than another.
    """
    return max(1, -(-n_rows // (BLOCKS_PER_TASK * parallel)))


def _single_threaded(batch: pd.DataFrame, fn: Callable, **kwargs: Any) -> dict[str, np.ndarray]:
    # a Ray task worker owns one CPU; OpenCV's own thread pool would oversubscribe it
    cv2.setNumThreads(1)
    return fn(batch, **kwargs)


def _native_size(row: Any, shape: tuple[int, int]) -> tuple[int, int]:
    height = shape[0] if pd.isna(row.height) else int(row.height)
    width = shape[1] if pd.isna(row.width) else int(row.width)
    if (height, width) != tuple(shape):
        raise DataError(f"{row.path} (image {row.image_id}): the pixels are {shape[0]}x{shape[1]} but the "
                        f"listing says {height}x{width}; re-export the file or fix the listing")
    return height, width


# --------------------------------------------------------------------------- manifest, cache, report


@dataclass(frozen=True)
class Prepared:
    """The manifest (MANIFEST_COLUMNS, cache order) and the cache arrays, row for row."""

    manifest: pd.DataFrame
    images: np.ndarray  # float16 (N, S, S)
    masks: np.ndarray  # uint8 (N, S, S)
    selection: Selection
    duplicates: pd.DataFrame  # image_id, duplicate_of: images dropped by data.dedupe_pixels


def prepare_data(images: pd.DataFrame, split_cfg: SplitConfig, preprocess_cfg: PreprocessConfig,
                 workers: Workers, dedupe_pixels: bool = False) -> Prepared:
    """Select and split the labelled images, then decode, hash and preprocess the selection."""
    if images.empty:
        raise DataError("no labelled images were found; check data.root and data.labels")
    duplicates = pixel_duplicates(images, workers) if dedupe_pixels else _no_duplicates()
    images = images[~images["image_id"].isin(duplicates["image_id"])]
    selection = plan_selection(*available(images), split_cfg)
    chosen = apply_selection(images, selection, split_cfg.seed)
    print(f"prepare: selected {len(chosen)} of {len(images)} labelled images: {selection.rule}")
    for note in selection.notes:
        print(f"prepare: note: {note}")
    columns = map_rows(chosen, process_batch, workers, "preprocess", cfg=preprocess_cfg)
    manifest = chosen.assign(**{key: columns[key] for key in ("mask_fraction", "content_hash",
                                                                 "height", "width")})
    manifest = manifest.assign(path=manifest["path"].astype(str))[MANIFEST_COLUMNS]
    return Prepared(manifest.reset_index(drop=True), columns["image"], columns["mask"], selection, duplicates)


def pixel_duplicates(images: pd.DataFrame, workers: Workers) -> pd.DataFrame:
    """Images whose decoded pixels equal an earlier image's (by image_id); the first is kept."""
    ordered = images.sort_values("image_id", kind="stable")
    hashes = pd.DataFrame(map_rows(ordered, pixel_hash_batch, workers, "pixel hashes"))
    first = hashes.groupby("pixel_hash", sort=False)["image_id"].transform("first")
    dropped = hashes[hashes["image_id"] != first]
    return pd.DataFrame({"image_id": dropped["image_id"].to_numpy(), "duplicate_of": first[dropped.index].to_numpy()})


def write_manifest(manifest: pd.DataFrame, path: str | Any) -> None:
    write_atomic(path, lambda tmp: manifest.to_parquet(tmp, index=False))


def cache_index(manifest: pd.DataFrame) -> pd.DataFrame:
    """The cache's index columns (training.cache.INDEX_COLUMNS minus row), in manifest order."""
    return manifest[["image_id", "split", "label", "mask_fraction"]]


def data_report(prepared: Prepared, unlabelled: list[str], orphans: list[str], layout: str,
                source: str) -> dict[str, Any]:
    """What was used and what was left out, as plain JSON-able values."""
    manifest = prepared.manifest
    positive_fraction = manifest.loc[manifest["label"] == 1, "mask_fraction"]
    counts = {}
    for split in (*SPLITS, "total"):
        rows = manifest if split == "total" else manifest[manifest["split"] == split]
        counts[split] = {"positive": int((rows["label"] == 1).sum()),
                         "negative": int((rows["label"] == 0).sum()), "images": len(rows)}
    return {
        "source": source,
        "layout": layout,
        "selection": {"rule": prepared.selection.rule, "notes": list(prepared.selection.notes),
                      **{k: v for k, v in asdict(prepared.selection).items() if k not in ("rule", "notes")}},
        "counts": counts,
        "unlabelled": {"count": len(unlabelled), "examples": list(unlabelled[:5])},
        "orphans": {"count": len(orphans), "examples": list(orphans[:5])},
        "duplicates_removed": {"count": len(prepared.duplicates),
                               "pairs": prepared.duplicates.head(20).to_dict("records")},
        "mask_fraction_positive_quantiles": {f"{q:.0%}": float(positive_fraction.quantile(q))
                                             for q in QUANTILES},
    }


def format_report(report: dict[str, Any]) -> str:
    """The data report as a readable text table."""
    lines = [f"data report ({report['source']}, {report['layout']} layout)",
             f"  {'split':<6} {'positive':>9} {'negative':>9} {'images':>8}"]
    for split, row in report["counts"].items():
        lines.append(f"  {split:<6} {row['positive']:>9} {row['negative']:>9} {row['images']:>8}")
    for key, what in (("unlabelled", "unlabelled images (excluded)"),
                      ("orphans", "label rows without an image"),
                      ("duplicates_removed", "pixel duplicates removed")):
        lines.append(f"  {what}: {report[key]['count']}")
    quantiles = report["mask_fraction_positive_quantiles"]
    lines.append("  mask fraction of positives: " + ", ".join(f"{q} {v:.4f}" for q, v in quantiles.items()))
    lines.append(f"  selection: {report['selection']['rule']}")
    lines.extend(f"  note: {note}" for note in report["selection"]["notes"])
    return "\n".join(lines)


def _no_duplicates() -> pd.DataFrame:
    return pd.DataFrame({"image_id": pd.Series(dtype=object), "duplicate_of": pd.Series(dtype=object)})
