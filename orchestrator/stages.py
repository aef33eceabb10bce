"""The prepare stage: manifest, split, preprocessing cache and data report.

Its completion record (`stages/prepare.json`, the study contract's rule) holds the config
sections the prepared data depends on; it is written last, after every output is in place.
"""

from __future__ import annotations

import dataclasses
import json

from orchestrator.ray_setup import init_ray
from study import objectstore
from study.atomic import write_text_atomic
from study.config import StudyConfig, dump_config
from study.errors import ConfigError
from study.records import fingerprint, prepare_inputs, record_reason, write_record
from study.store import StudyStore
from training.cache import write_cache
from training.data import SiimIndex, load_siim
from training.data_report import data_report, format_report
from training.prepare import Prepared, cache_index, prepare_data, write_manifest
from training.source import LAYOUT_OF_SOURCE
from training.synth import generate


def prepare_stage(config: StudyConfig, force: bool = False) -> StudyStore:
    """Build the manifest, split, preprocessing cache and data report (skipped when up to date)."""
    store = StudyStore(config.study_dir)
    save_config(store, config)
    inputs, record = prepare_inputs(config), store.stage_record("prepare")
    reason = "--force" if force else record_reason(record, inputs)
    if reason is None:
        print(f"prepare: up to date in {store.data_dir} (inputs {fingerprint(inputs)}); nothing to do")
        return store
    print(f"prepare: {reason}; preparing the data")
    objectstore.remove([record])
    index = _load_source(config, store)
    prepared = _build(config, store, index)
    report = _report(config, store, index, prepared)
    write_record(record, inputs, images=len(prepared.manifest),
                 splits={split: row["images"] for split, row in report["counts"].items()},
                 vouches_for=[store.data_dir], own_folder=False)  # the manifest, the cache, the data report
    return store


def save_config(store: StudyStore, config: StudyConfig) -> None:
    """Write the resolved config unless the same text is already there."""
    text = dump_config(config)
    if not store.config_path.is_file() or store.config_path.read_text() != text:
        write_text_atomic(store.config_path, text)


def _load_source(config: StudyConfig, store: StudyStore) -> SiimIndex:
    data = config.data
    if data.source == "synthetic":
        generate(store.source_dir, **dataclasses.asdict(data.synthetic))  # skips when already complete
        index = load_siim(store.source_dir, strict=data.strict)
    else:
        index = load_siim(data.root, labels=data.labels, strict=data.strict)
        if index.layout != LAYOUT_OF_SOURCE[data.source]:
            raise ConfigError(f"data.source is {data.source!r} but {data.root} holds the "
                              f"{index.layout} layout; set data.source: "
                              f"{next(k for k, v in LAYOUT_OF_SOURCE.items() if v == index.layout)!r}")
    print(f"prepare: {len(index.images)} labelled images in {data.root or store.source_dir} "
          f"({index.layout} layout; {len(index.unlabelled)} unlabelled, {len(index.orphans)} orphan label rows)")
    return index


def _build(config: StudyConfig, store: StudyStore, index: SiimIndex) -> Prepared:
    workers = config.resources.prepare_actors
    if store.remote and config.data.source == "synthetic" and workers != 0:
        # the synthetic source lives in this node's mirror only: Ray tasks elsewhere could not read it
        print("prepare: synthetic data of a study in object storage is preprocessed in this process")
        workers = 0
    if workers != 0:  # 0: the in-process loop, no Ray
        init_ray(config)
    prepared = prepare_data(index.images, config.split, config.preprocess, workers,
                            dedupe_pixels=config.data.dedupe_pixels)
    write_manifest(prepared.manifest, store.manifest_path)
    write_cache(store.cache_dir, cache_index(prepared.manifest), prepared.images, prepared.masks)
    print(f"prepare: wrote {store.manifest_path} and {store.cache_dir} ({prepared.images.nbytes / 1e6:.1f} MB of images)")
    return prepared


def _report(config: StudyConfig, store: StudyStore, index: SiimIndex, prepared: Prepared) -> dict:
    source = config.data.root or f"synthetic ({store.source_dir})"
    report = data_report(prepared, index.unlabelled, index.orphans, index.layout, source)
    write_text_atomic(store.data_report_path, json.dumps(report, indent=2))
    print(format_report(report))
    return report
