"""The four stages through the one skeleton (orchestrator/stages.py): one entry per stage in run
order, each skips an output whose record matches, redoes one whose inputs changed with the
reason on one `[stage]` line, removes what is stale before building, and writes its record last.
The builds are replaced by fakes: no Ray, no training, no data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import pipeline, stages, train_runs
from study.config import load_config
from study.errors import TrainingError
from study.records import STAGE_NAMES, prepare_inputs, read_record, write_record
from study.runs import plan_runs
from study.store import StudyStore
from tests.conftest import ROOT


def _study(tmp_path: Path, **overrides):
    config = load_config(ROOT / "configs" / "demo.yaml", {"storage": str(tmp_path), "models.names": ["resnet18"],
                                                          "training.seeds": [0, 1], **overrides})
    store = StudyStore(config.study_dir)
    store.root.mkdir(parents=True)
    return config, store


def _tracker(online: bool = False) -> SimpleNamespace:
    """What the stages ask of a tracker: whether MLflow is reachable, and its URI for the UI line."""
    return SimpleNamespace(online=online, uri="sqlite:////tmp/none.db", experiment_id="1",
                           call=lambda action, *args, **kwargs: action(*args, **kwargs))


def test_one_entry_per_stage_in_run_order():
    assert tuple(stages.STAGES) == STAGE_NAMES == ("prepare", "train", "explain", "analyze")
    assert pipeline.forced_stages("explain") == ("explain", "analyze") and pipeline.forced_stages(None) == ()


def test_prepare_is_skipped_while_its_record_matches_and_redone_without_its_record_when_a_section_changed(
        tmp_path, monkeypatch, capsys):
    config, store = _study(tmp_path)
    record = store.stage_record("prepare")
    write_record(record, prepare_inputs(config), vouches_for=[store.data_dir], own_folder=False)

    def not_now(*args):
        raise AssertionError("built although up to date")

    monkeypatch.setattr(stages, "_load_source", not_now)
    stages.stage_prepare(config, store)
    assert capsys.readouterr().out.startswith(f"[prepare] up to date in {store.data_dir} (inputs ")
    assert store.config_path.is_file()  # the resolved config is saved either way

    built = []
    monkeypatch.setattr(stages, "_load_source", lambda config, store: built.append(record.exists()) or "index")
    monkeypatch.setattr(stages, "_build", lambda config, store, index: SimpleNamespace(manifest=[1, 2, 3]))
    monkeypatch.setattr(stages, "_report", lambda *args: {"counts": {"train": {"images": 3}}})
    smaller = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, image_size=32))
    stages.stage_prepare(smaller, store)
    assert capsys.readouterr().out == "[prepare] preprocess.image_size changed; preparing the data\n"
    assert built == [False]  # the old record went before the build
    assert read_record(record)["inputs"] == prepare_inputs(smaller) and read_record(record)["images"] == 3


def _train_fakes(monkeypatch):
    trained, reconciled = [], []
    monkeypatch.setattr(stages, "init_ray", lambda config: None)
    monkeypatch.setattr(train_runs, "placement", lambda config: "the placement")
    monkeypatch.setattr(train_runs, "train_plans", lambda config, store, tracker, todo, placement: trained.append(
        ([plan.key for plan in todo], placement, [plan.run_dir.exists() for plan in todo])))
    monkeypatch.setattr(train_runs, "reconcile_child", lambda config, store, tracker, plan: reconciled.append(plan.key))
    return trained, reconciled


def test_train_skips_finished_runs_trains_the_others_and_with_force_removes_every_run_first(
        tmp_path, monkeypatch, capsys):
    config, store = _study(tmp_path)
    trained, reconciled = _train_fakes(monkeypatch)
    done, resumed = plan_runs(config, store)
    write_record(done.run_dir / StudyStore.DONE, done.inputs)
    resumed.run_dir.mkdir(parents=True)
    (resumed.run_dir / StudyStore.CHECKPOINT).write_bytes(b"epoch 1")
    stages.stage_train(config, store, _tracker())
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["[train] resnet18-seed0: finished earlier, skipped",
                         "[train] resnet18-seed1: not done yet; resuming from its last checkpoint"]
    assert lines[2].startswith("[train] compare runs in MLflow: ")
    assert trained == [(["resnet18-seed1"], "the placement", [True])] and reconciled == ["resnet18-seed0"]

    stages.stage_train(config, store, _tracker(), force=True)
    assert capsys.readouterr().out.splitlines()[:2] == ["[train] resnet18-seed0: --force; training it",
                                                         "[train] resnet18-seed1: --force; training it"]
    assert trained[-1] == (["resnet18-seed0", "resnet18-seed1"], "the placement", [False, False])


def test_train_refuses_a_run_finished_with_other_settings_before_any_line(tmp_path, monkeypatch, capsys):
    config, store = _study(tmp_path)
    trained, _ = _train_fakes(monkeypatch)
    done, _ = plan_runs(config, store)
    write_record(done.run_dir / StudyStore.DONE, {**done.inputs, "batch_size": 64})
    with pytest.raises(TrainingError, match="batch_size changed"):
        stages.stage_train(config, store, _tracker())
    assert trained == [] and "[train]" not in capsys.readouterr().out


def test_analyze_is_reused_redone_when_a_reason_appears_and_records_what_it_was_made_from(
        tmp_path, monkeypatch, capsys):
    import analysis.report

    config, store = _study(tmp_path)
    analysed = []

    def analyze(store_, config_, tracker, runs):
        assert store_ is store and config_ is config  # the command's objects, end to end
        analysed.append(store.stage_record("analyze").exists())
        store.analysis_dir.mkdir(exist_ok=True)
        (store.analysis_dir / "report.html").write_text("<html>")

    monkeypatch.setattr(analysis.report, "analyze", analyze)
    report = stages.stage_analyze(config, store, _tracker())
    assert report == str(store.analysis_dir / "report.html")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["[analyze] not done yet; analysing 2 run(s)", f"[analyze] report: {report}"]
    assert lines[2].startswith("[analyze] compare runs in MLflow: ")
    assert read_record(store.stage_record("analyze"))["logged"] is False

    stages.stage_analyze(config, store, _tracker())
    assert capsys.readouterr().out.splitlines()[0] == f"[analyze] up to date: {report}" and len(analysed) == 1
    stages.stage_analyze(config, store, _tracker(online=True))  # MLflow reachable now: log what it lacks
    assert capsys.readouterr().out.splitlines()[0] == ("[analyze] its results have not reached MLflow yet; "
                                                       "analysing 2 run(s)")
    (store.analysis_dir / "report.html").unlink()  # a file its record vouches for
    stages.stage_analyze(config, store, _tracker(online=True))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("[analyze] ")
    assert line.endswith("report.html is missing (recorded 6 bytes); analysing 2 run(s)")
    assert analysed == [False, False, False]  # each time without its old record
