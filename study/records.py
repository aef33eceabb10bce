"""Stage records: what each output was made from and vouches for, and the one completion rule
(torch-free).

- **The completion rule**: a stage's output (the prepared data, one run's CAMs, the analysis)
  carries a record of the *inputs* it was made from: the config keys it depends on, the
  fingerprints of what it read from upstream, and `SCORING_VERSION`. It is reused only when the
  fingerprint of the inputs the config asks for now is the recorded one; otherwise it is redone
  and `record_reason` says which dotted keys changed ("cam.methods changed"). A training run's
  `done.json` follows the same rule, but a changed run is refused rather than retrained (hours of
  GPU time): `--force train` says so explicitly.
- **What a record vouches for**: the record also lists the files it vouches for, each with its
  size, SHA-256 and modification time (`vouched_files`), and the output is reused only while each
  is still there with its size and content (`damaged_file`: the hash is recomputed only when the
  modification time moved, so a rerun over a large store costs a stat per file). A truncated or
  changed file is a reason like any other ("cams/resnet18-seed0/part-00000.parquet is 1,234
  bytes, recorded 2,468 (truncated or changed)"): the stage redoes what produced it; a damaged
  training output is refused like a changed run.

Execution settings (batch sizes of inference, worker counts, actor counts) are not inputs:
they change how fast a result comes, not the result.

**The stage skeleton** (`run_stage`): every stage (prepare, train, explain with its baselines and
one output per run, analyze) is the same steps over its `Output`s: compute the inputs, ask the
completion rule why each must be made (`record_reason`, or the stage's own rule: a changed
training run is refused), print one line per output (`[explain] resnet18-seed0: up to date,
skipped`, or `[explain] resnet18-seed0: cam.methods changed; computing its heatmaps`), remove
what is stale, build what must be made, and write each record last with the inputs decided on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

from study import objectstore
from study.atomic import write_text_atomic
from study.errors import StoreError
from study.models import TRAINING_FIELDS
from study.store import StudyStore, run_key

if TYPE_CHECKING:
    from study.models import ModelSpec
    from study.recipes import Recipe

# Bump when the prepared data gains or changes a column: the prepare stage is redone (its inputs
# include this), the training runs are not (theirs name the config sections, not this).
PREPARE_VERSION = 2  # 2: rle_rows and the lesion covariates in the manifest and the cache index
# Bump when a metric definition or the CAM post-processing changes (docs/STUDY.md §4-5, §9, §10): every
# run's CAM output is then recomputed, and the analysis after it.
SCORING_VERSION = 3  # 3: layer sweep, auprc/auroc_pixel, tuned thresholds, lesion covariates
# Bump when a table, statistic or the report changes: the analysis is redone.
ANALYSIS_VERSION = 4  # 4: layer_vs_final, calls at the threshold, cascade step verdicts, summary.md, runs table in MLflow

# --------------------------------------------------------------------------- the completion rule


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (key order does not matter)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(inputs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"cam": {"methods": [...]}} -> {"cam.methods": [...]}: the names a reason line uses."""
    flat: dict[str, Any] = {}
    for key, value in inputs.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two input records (added and removed ones too)."""
    before, after = flatten(old), flatten(new)
    same = lambda key: json.dumps(before.get(key), default=str) == json.dumps(after.get(key), default=str)
    return [key for key in dict.fromkeys([*before, *after]) if key not in before or key not in after or not same(key)]


def write_record(path: Path, inputs: Mapping[str, Any], *, vouches_for: Iterable[Path] = (),
                 own_folder: bool = True, **info: Any) -> None:
    """The completion record of an output: written last, after the output is in place.

    It vouches for every regular file in its own folder (`own_folder`; the record itself and
    writers' temporaries excepted) and for the files and folders in `vouches_for`, as they are
    now (`vouched_files`). A record written in a temporary folder that is then renamed into place
    stays right: each file is named relative to the record's folder."""
    record = {"fingerprint": fingerprint(inputs), "inputs": inputs,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info,
              FILES: vouched_files(path, vouches_for, own_folder)}
    write_text_atomic(path, json.dumps(record, indent=2, default=str))


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """The record at `path`, or None when there is none (or it cannot be read: redo the work)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_reason(path: Path, inputs: Mapping[str, Any]) -> Optional[str]:
    """None when the output at `path` was made from exactly `inputs` and every file its record
    vouches for is intact; else why it must be redone (one line). A record written before records
    listed their files vouches for nothing: it is judged by its inputs alone, as it was."""
    record = read_record(path)
    if record is None:
        return "not done yet"
    if record.get("fingerprint") == fingerprint(inputs):
        return damaged_file(path, record)
    if not isinstance(record.get("inputs"), Mapping):
        return "made by an older camstudy that did not record its inputs"
    keys = changed_keys(record["inputs"], inputs)
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return f"{shown} changed" if keys else "its inputs changed"


def require_intact(path: Path, remedy: str) -> None:
    """A StoreError (one line: the file, then `remedy`) when the record at `path` vouches for a
    damaged file; nothing when it has no record (whether it is needed is its reader's business)."""
    record = read_record(path)
    damage = damaged_file(path, record) if record is not None else None
    if damage is not None:
        raise StoreError(f"{damage}; {remedy}")


# --------------------------------------------------------------------------- the stage skeleton


STAGE_NAMES = ("prepare", "train", "explain", "analyze")  # the study's stages, in the order they run


@dataclasses.dataclass
class Output:
    """One output of a stage and its completion record: what the stage skeleton decides on.

    `inputs` are computed once: the decision is made on them and the record holds them
    (`done`). `stale`: what goes before the output is made again (a record outside the output's
    own folder, so it never vouches for files being rewritten); `whole`: what `--force` removes
    as well (everything the output is, so nothing of it is reused). An output written into a
    temporary folder that is renamed into place needs neither: the rename replaces it whole."""

    name: str  # how its console lines name it: "" for a stage's one output, else a run key or "baselines"
    record: Path
    inputs: Mapping[str, Any]
    stale: tuple[Path, ...] = ()
    whole: tuple[Path, ...] = ()
    item: Any = None  # what the build makes it from (a training run's RunPlan)
    reason: Optional[str] = None  # why it is made (set by `run_stage`; None: reused)

    def done(self, at: Optional[Path] = None, **info: Any) -> None:
        """Write its record (`write_record`) with the inputs it was decided on, last, once the
        output is in place; `at`: the record's place in a temporary folder renamed into place."""
        write_record(self.record if at is None else at, self.inputs, **info)


Said = Union[str, Callable[[Output], str]]  # a console line's text, or how to make it from the output


def run_stage(stage: str, outputs: Iterable[Output], build: Callable[[list[Output]], Any], *,
              doing: Said, reused: Said = "up to date, skipped", force: bool = False,
              judge: Optional[Callable[[Output], Optional[str]]] = None,
              on_reused: Optional[Callable[[Output], Any]] = None) -> list[Output]:
    """The one skeleton of every stage. For each output, why it must be made: `--force`, else
    `judge(output)` (default: the completion rule, `record_reason(output.record, output.inputs)`;
    a judge may raise to refuse, e.g. a training run that finished with other settings). Every
    reason is known before anything is printed or removed. Then one line per output, in order:
    `[stage] name: reused` for one that is reused (then `on_reused(output)`), `[stage] name:
    reason; doing` for one to be made; then the stale part of those is removed (with `--force`
    their whole output), and `build(todo)` is called once with all of them (not at all when none
    is), writing each one's record last (`Output.done`). Returns the outputs made."""
    outputs = list(outputs)
    judge = judge or (lambda output: record_reason(output.record, output.inputs))
    for output in outputs:
        output.reason = "--force" if force else judge(output)
    todo = [output for output in outputs if output.reason is not None]
    for output in outputs:
        said = reused if output.reason is None else doing
        text = said(output) if callable(said) else said
        named = f"{output.name}: " if output.name else ""
        print(f"[{stage}] {named}{text}" if output.reason is None else f"[{stage}] {named}{output.reason}; {text}",
              flush=True)
        if output.reason is None and on_reused is not None:
            on_reused(output)
    if not todo:
        return []
    objectstore.remove(dict.fromkeys(path for output in todo
                                     for path in (*output.stale, *(output.whole if force else ()))))
    build(todo)
    return todo


# --------------------------------------------------------------------------- what a record vouches for

FILES = "files"  # a record's key: {path relative to the record's folder: {"bytes", "sha256", "mtime_ns"}}
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, hashed once per process


def vouched_files(record: Path, vouches_for: Iterable[Path] = (), own_folder: bool = True) -> dict[str, dict]:
    """Each regular file in the record's folder (with `own_folder`) and in `vouches_for` (files,
    or folders: every file below them), keyed by its path relative to the record's folder, with
    its size, SHA-256 and modification time. Hashing reads each file once (~1.6 GB/s): a small
    share of the stage that wrote it. Skipped: the record itself, writers' temporaries, and a
    path of `vouches_for` that does not exist (nothing to vouch for)."""
    record = Path(record).absolute()
    folder = record.parent
    files: dict[str, dict] = {}
    for top in ([folder] if own_folder else []) + [Path(p).absolute() for p in vouches_for]:
        below = sorted(top.rglob("*")) if top.is_dir() else [top] if top.is_file() else []
        for file in below:
            if file == record or not file.is_file() or any(map(objectstore.is_temporary, file.relative_to(top).parts)):
                continue
            info = file.stat()
            files[Path(os.path.relpath(file, folder)).as_posix()] = {
                "bytes": info.st_size, "sha256": _digest(file, info), "mtime_ns": info.st_mtime_ns}
    return files


def damaged_file(path: Path, record: Mapping[str, Any]) -> Optional[str]:
    """One line naming the first file the record at `path` vouches for that is missing or differs
    from the record, None when every one is intact (or the record lists none)."""
    files = record.get(FILES)
    if not isinstance(files, Mapping):
        return None
    folder = Path(path).parent
    for name, recorded in files.items():
        file = Path(os.path.normpath(folder / name))
        try:
            info = file.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            return f"{_shown(file)} is missing (recorded {recorded.get('bytes', 0):,} bytes)"
        if info.st_size != recorded.get("bytes"):
            return (f"{_shown(file)} is {info.st_size:,} bytes, recorded {recorded.get('bytes', 0):,} "
                    "(truncated or changed)")
        if info.st_mtime_ns != recorded.get("mtime_ns") and _digest(file, info) != recorded.get("sha256"):
            return f"{_shown(file)} has changed since it was recorded (same size, another SHA-256)"
    return None


def _digest(file: Path, info: os.stat_result) -> str:
    key = (str(file), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        with open(file, "rb") as handle:
            _DIGESTS[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _DIGESTS[key]


def _shown(file: Path) -> str:
    """A file as a reason line names it: relative to its study (the folder holding study.json),
    else in full."""
    for folder in list(file.parents)[:4]:
        if (folder / StudyStore.STUDY_FILE).is_file():
            return file.relative_to(folder).as_posix()
    return str(file)


# --------------------------------------------------------------------------- what each stage depends on


def prepare_inputs(config: Any) -> dict[str, Any]:
    """The prepared data (manifest, split, cache) depends on these config sections only."""
    plain = config.to_dict()
    return {**{section: plain[section] for section in ("data", "split", "preprocess")},
            "prepare_version": PREPARE_VERSION}


def explain_inputs(config: Any, train_fingerprint: str) -> dict[str, Any]:
    """One run's CAM output: the trained run, which maps are made at which layers on which images,
    how they are scored, and the prepared data (validation positives tune the IoU threshold; the
    lesion covariates come from the cache index), and the faithfulness and robustness settings
    (docs/STUDY.md §11: a section turned off is `{"enabled": false}` alone, so its other keys then
    change nothing). (`cam.batch_size` changes only the speed.)"""
    cam, plain = config.cam, config.to_dict()
    return {"train": {"fingerprint": train_fingerprint},
            "cam": {"methods": list(cam.methods), "layers": list(cam.layers), "images": cam.images,
                    "sanity_randomized": cam.sanity_randomized},
            "sanity": {"cascade": plain["sanity"]["cascade"]},
            "prepare": fingerprint(prepare_inputs(config)),
            "metrics": plain["metrics"], "scoring_version": SCORING_VERSION,
            **{section: plain[section] if plain[section]["enabled"] else {"enabled": False}
               for section in ("faithfulness", "robustness")}}


def baselines_inputs(config: Any) -> dict[str, Any]:
    """The baseline maps (location prior, image-only): the prepared data, their settings, the scoring."""
    plain = config.to_dict()
    return {"prepare": fingerprint(prepare_inputs(config)), "baselines": plain["baselines"],
            "metrics": plain["metrics"], "scoring_version": SCORING_VERSION}


def analyze_inputs(config: Any, store: "StudyStore", runs: list[tuple]) -> dict[str, Any]:
    """The analysis: the CAM output and training run of every run the config names (each by its
    record's fingerprint; None when it has none), the baselines, the prepared data, the statistics settings,
    the decision threshold the report quotes, and where results are logged."""
    plain = config.to_dict()
    recorded = lambda path: (read_record(path) or {}).get("fingerprint")  # noqa: E731
    cams = {run_key(*run): recorded(store.maps_dir(*run) / StudyStore.CAM_DONE) for run in runs}
    trained = {run_key(*run): recorded(store.run_dir(*run) / StudyStore.DONE) for run in runs}
    return {"cams": cams, "train": trained, "prepare": fingerprint(prepare_inputs(config)),
            "baselines": recorded(store.baselines_dir / StudyStore.CAM_DONE),
            "statistics": plain["statistics"], "sanity": plain["sanity"], "tuning": plain["tuning"],
            "training": {"threshold": plain["training"]["threshold"]},
            "tracking": plain["tracking"], "analysis_version": ANALYSIS_VERSION}

def run_inputs(spec: "ModelSpec", recipe: "Recipe", config: Any, seed: int, permuted_labels: bool = False) -> dict:
    """Everything that changes what a run computes (the inputs of the study contract's rule)."""
    training = config.training
    relevant = {"spec": {name: getattr(spec, name) for name in TRAINING_FIELDS}, "recipe": dataclasses.asdict(recipe), "seed": seed,
                "init": config.models.init, "weights_file": config.models.weights_files.get(spec.name),
                "preprocess": dataclasses.asdict(config.preprocess), "augment": dataclasses.asdict(config.augment),
                "data": {key: value for key, value in dataclasses.asdict(config.data).items()
                         if key not in ("root", "labels")},  # paths may differ between machines
                "split": dataclasses.asdict(config.split), "batch_size": training.batch_size,
                "selection": training.selection, "threshold": training.threshold, "amp": training.amp}
    if config.resources.workers_per_run > 1:  # only then: single-worker fingerprints stay as they were
        relevant["workers_per_run"] = config.resources.workers_per_run
    if permuted_labels:  # likewise
        relevant["permuted_labels"] = True
    return json.loads(json.dumps(relevant, default=str))  # as stored in done.json and compared
