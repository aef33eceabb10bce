"""Stage outputs are checked before use: a completion record lists the files it vouches for (size,
SHA-256, modification time), and a missing, truncated or changed file is a reason naming it, so the
stage redoes what produced it (a finished training run is refused instead: hours of GPU time); a
full disk while writing is one line naming the output, with nothing partial left; in object
storage the bucket, not the node-local mirror, says what is done."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from study import objectstore, records
from study.atomic import atomic_dir, write_atomic, write_text_atomic
from study.records import FILES, read_record, record_reason, require_intact, vouched_files, write_record
from study.runs import finished_run
from study.store import StudyStore
from study.errors import StoreError, TrainingError
from tests.e2e.test_objectstore import BUCKET, s3  # noqa: F401 (the moto server fixture, reused)
from tests.conftest import ROOT

INPUTS = {"cam": {"methods": ["gradcam"]}, "scoring_version": 3}


def _study(tmp_path: Path) -> Path:
    """A study folder as open_study leaves it (study.json: reason lines name files relative to it)."""
    root = tmp_path / "demo"
    root.mkdir()
    (root / "study.json").write_text("{}")
    return root


def _explain_output(root: Path, cams: bytes = b"c" * 2468, sanity: bytes = b"s" * 900) -> Path:
    """sanity/<run>/ first, then cams/<run>/ with its record vouching for both, as the explain stage
    writes them: the record is written inside the temporary folder that is renamed into place."""
    with atomic_dir(root / "sanity" / "resnet18-seed0") as tmp:
        (tmp / StudyStore.CAM_PART).write_bytes(sanity)
    with atomic_dir(root / "cams" / "resnet18-seed0") as tmp:
        (tmp / StudyStore.CAM_PART).write_bytes(cams)
        (tmp / StudyStore.CAM_TUNING).write_text("{}")
        (tmp / f".{StudyStore.CAM_PART}.tmp-4242").write_bytes(b"a writer's temporary")
        write_record(tmp / StudyStore.CAM_DONE, INPUTS, vouches_for=[root / "sanity" / "resnet18-seed0"], rows=3)
    return root / "cams" / "resnet18-seed0" / StudyStore.CAM_DONE


# --------------------------------------------------------------------------- what a record vouches for


def test_a_record_vouches_for_its_folder_and_the_folders_named_and_stays_right_after_the_rename(tmp_path):
    record = _explain_output(_study(tmp_path))
    files = read_record(record)[FILES]
    assert sorted(files) == ["../../sanity/resnet18-seed0/part-00000.parquet", "_tuning.json", "part-00000.parquet"]
    assert files["part-00000.parquet"]["bytes"] == 2468 and len(files["part-00000.parquet"]["sha256"]) == 64
    assert read_record(record)["rows"] == 3  # the stage's own facts are kept beside the list
    assert record_reason(record, INPUTS) is None


def test_a_truncated_file_is_one_line_naming_it_and_a_changed_input_still_says_which_key(tmp_path):
    record = _explain_output(_study(tmp_path))
    os.truncate(record.parent / StudyStore.CAM_PART, 1234)
    assert record_reason(record, INPUTS) == ("cams/resnet18-seed0/part-00000.parquet is 1,234 bytes, "
                                             "recorded 2,468 (truncated or changed)")
    assert record_reason(record, {**INPUTS, "scoring_version": 4}) == "scoring_version changed"
    (record.parent.parent.parent / "sanity" / "resnet18-seed0" / StudyStore.CAM_PART).unlink()
    (record.parent / StudyStore.CAM_PART).write_bytes(b"c" * 2468)  # the same bytes again: intact
    assert record_reason(record, INPUTS) == "sanity/resnet18-seed0/part-00000.parquet is missing (recorded 900 bytes)"


def test_a_same_size_change_is_found_by_its_hash_which_is_recomputed_only_when_the_time_moved(tmp_path, monkeypatch):
    record = _explain_output(_study(tmp_path))
    hashed = []
    digest = records._digest
    monkeypatch.setattr(records, "_digest", lambda file, info: hashed.append(file.name) or digest(file, info))
    assert record_reason(record, INPUTS) is None and hashed == []  # size and time as recorded: no read
    part = record.parent / StudyStore.CAM_PART
    recorded = part.stat().st_mtime_ns
    part.write_bytes(b"C" + b"c" * 2467)
    assert record_reason(record, INPUTS) == ("cams/resnet18-seed0/part-00000.parquet has changed since it was "
                                             "recorded (same size, another SHA-256)")
    assert hashed == [StudyStore.CAM_PART]
    part.write_bytes(b"c" * 2468)
    os.utime(part, ns=(recorded, recorded + 1))  # touched, content as recorded: hashed, and intact
    assert record_reason(record, INPUTS) is None


def test_a_record_of_an_older_camstudy_with_no_file_list_is_judged_by_its_inputs_alone(tmp_path):
    record = _explain_output(_study(tmp_path))
    older = read_record(record)
    del older[FILES]
    record.write_text(json.dumps(older))
    os.truncate(record.parent / StudyStore.CAM_PART, 10)
    assert record_reason(record, INPUTS) is None  # vouches for nothing, as before


def test_a_stage_record_outside_its_outputs_vouches_for_the_folders_named_only(tmp_path):
    root = _study(tmp_path)
    (root / "stages").mkdir()
    (root / "stages" / "analyze.json").write_text("{}")  # another stage's record: not prepare's
    write_atomic(root / "data" / "manifest.parquet", lambda tmp: pd.DataFrame({"a": [1, 2]}).to_parquet(tmp))
    with atomic_dir(root / "data" / "cache") as tmp:
        (tmp / "images.npy").write_bytes(b"i" * 64)
    write_record(root / "stages" / "prepare.json", INPUTS, vouches_for=[root / "data"], own_folder=False)
    assert sorted(read_record(root / "stages" / "prepare.json")[FILES]) == [
        "../data/cache/images.npy", "../data/manifest.parquet"]
    os.truncate(root / "data" / "cache" / "images.npy", 0)
    assert record_reason(root / "stages" / "prepare.json", INPUTS) == (
        "data/cache/images.npy is 0 bytes, recorded 64 (truncated or changed)")


def test_a_damaged_training_output_is_refused_in_one_line_naming_the_file_and_the_remedy(tmp_path):
    run_dir = _study(tmp_path) / "train" / "resnet18-seed0"
    write_atomic(run_dir / StudyStore.PREDICTIONS, lambda tmp: pd.DataFrame({"p": [0.1, 0.9]}).to_parquet(tmp))
    write_text_atomic(run_dir / StudyStore.TEST_METRICS, '{"auc": 1.0}')
    write_text_atomic(run_dir / StudyStore.CHECKPOINT, "removed when the run finishes")
    files = vouched_files(run_dir / StudyStore.DONE, [run_dir / StudyStore.PREDICTIONS, run_dir / StudyStore.TEST_METRICS],
                          own_folder=False)
    assert sorted(files) == [StudyStore.PREDICTIONS, StudyStore.TEST_METRICS]
    write_text_atomic(run_dir / StudyStore.DONE, json.dumps({"fingerprint": "f1", "inputs": {}, FILES: files}))
    assert finished_run(run_dir, "f1")["fingerprint"] == "f1"
    predictions = (run_dir / StudyStore.PREDICTIONS).read_bytes()
    (run_dir / StudyStore.PREDICTIONS).write_bytes(predictions[: len(predictions) // 2])
    with pytest.raises(TrainingError) as refused:
        finished_run(run_dir, "f1")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("train/resnet18-seed0/predictions.parquet is ")
    assert "(truncated or changed)" in line and "rerun with `--force train` to retrain it, or restore the file" in line
    with pytest.raises(StoreError, match=r"^train/resnet18-seed0/predictions\.parquet is .*; read it again"):
        require_intact(run_dir / StudyStore.DONE, "read it again")
    require_intact(run_dir / "no-record.json", "never said")  # no record: nothing vouched for


def test_the_analysis_refuses_a_damaged_input_rather_than_reading_half_a_dataset(tmp_path):
    from types import SimpleNamespace

    from orchestrator.stages import _require_intact_inputs

    root = _study(tmp_path)
    record = _explain_output(root)
    store = StudyStore(root)
    plan = SimpleNamespace(spec=SimpleNamespace(name="resnet18"), seed=0, permuted=False,
                           run_dir=store.run_dir("resnet18", 0))
    _require_intact_inputs(store, [plan])  # intact; no training record, no baselines: nothing to check
    os.truncate(root / "sanity" / "resnet18-seed0" / StudyStore.CAM_PART, 450)
    with pytest.raises(StoreError) as refused:
        _require_intact_inputs(store, [plan])
    assert str(refused.value) == ("sanity/resnet18-seed0/part-00000.parquet is 450 bytes, recorded 900 (truncated or "
                                  "changed); run `camstudy explain` (or `camstudy run`) with the same config to "
                                  "recompute it")
    assert record.is_file()


# --------------------------------------------------------------------------- the stage skeleton


def _output(root: Path, name: str = "resnet18-seed0", inputs=INPUTS, **fields) -> records.Output:
    """An output whose folder holds one file and whose record sits beside it."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "maps.bin").write_bytes(b"maps")
    return records.Output(name, folder / "_done.json", inputs, **fields)


def _stage(outputs, force: bool = False, **options):
    """run_stage with a build that records what it was given and what existed when it started."""
    built = []

    def build(todo):
        built.append([(o.name, o.reason, [p.exists() for p in (*o.stale, *o.whole)]) for o in todo])
        for output in todo:
            output.done(rows=1)

    made = records.run_stage("explain", outputs, build, force=force, doing="computing its heatmaps", **options)
    return made, built


def test_the_skeleton_skips_an_output_whose_record_matches(tmp_path, capsys):
    output = _output(tmp_path)
    output.done()  # made from these inputs, its folder intact
    made, built = _stage([output])
    assert made == [] and built == [] and output.reason is None
    assert capsys.readouterr().out == "[explain] resnet18-seed0: up to date, skipped\n"


def test_the_skeleton_redoes_an_output_whose_input_changed_and_says_which(tmp_path, capsys):
    old = _output(tmp_path)
    old.done()
    changed = _output(tmp_path, inputs={**INPUTS, "cam": {"methods": ["gradcam", "gradcam++"]}})
    made, built = _stage([changed])
    assert made == [changed] and built == [[("resnet18-seed0", "cam.methods changed", [])]]
    assert capsys.readouterr().out == "[explain] resnet18-seed0: cam.methods changed; computing its heatmaps\n"
    assert read_record(changed.record)["inputs"] == changed.inputs and read_record(changed.record)["rows"] == 1
    assert record_reason(changed.record, changed.inputs) is None  # the record holds the inputs decided on


def test_the_skeleton_removes_the_stale_part_before_the_build_and_the_whole_output_with_force(tmp_path, capsys):
    stale, whole = tmp_path / "stages" / "old-record.json", tmp_path / "resnet18-seed0"
    stale.parent.mkdir()
    stale.write_text("{}")
    output = _output(tmp_path, stale=(stale,), whole=(whole,))
    made, built = _stage([output])  # not done yet: the stale record goes, the output's folder stays
    assert built == [[("resnet18-seed0", "not done yet", [False, True])]] and not stale.exists()
    made, built = _stage([output])
    assert built == []  # now up to date
    (whole / "maps.bin").write_bytes(b"maps")
    made, built = _stage([output], force=True)  # --force: the whole output goes before the build
    assert built == [[("resnet18-seed0", "--force", [False, False])]] and made == [output]
    assert capsys.readouterr().out.splitlines()[-1] == "[explain] resnet18-seed0: --force; computing its heatmaps"


def test_the_skeleton_builds_once_with_every_output_to_make_and_prints_one_line_each_in_order(tmp_path, capsys):
    done, fresh, changed = (_output(tmp_path, name) for name in ("a-seed0", "b-seed0", "c-seed0"))
    done.done()
    records.write_record(changed.record, {"cam": {"methods": ["hirescam"]}, "scoring_version": 3})
    reused = []
    made, built = _stage([done, fresh, changed], on_reused=reused.append)
    assert [output.name for output in made] == ["b-seed0", "c-seed0"] and len(built) == 1
    assert reused == [done]
    assert capsys.readouterr().out.splitlines() == [
        "[explain] a-seed0: up to date, skipped", "[explain] b-seed0: not done yet; computing its heatmaps",
        "[explain] c-seed0: cam.methods changed; computing its heatmaps"]


def test_a_stage_of_one_output_names_none_and_its_lines_can_say_more(tmp_path, capsys):
    output = _output(tmp_path, name="")
    records.run_stage("prepare", [output], lambda todo: output.done(), doing="preparing the data")
    records.run_stage("prepare", [output], lambda todo: None, doing="preparing the data",
                      reused=lambda o: f"up to date (inputs {records.fingerprint(o.inputs)}); nothing to do")
    assert capsys.readouterr().out.splitlines() == [
        "[prepare] not done yet; preparing the data",
        f"[prepare] up to date (inputs {records.fingerprint(INPUTS)}); nothing to do"]


def test_a_judge_that_refuses_stops_the_stage_before_any_line_or_removal(tmp_path, capsys):
    stale = tmp_path / "stale.json"
    stale.write_text("{}")
    first, second = _output(tmp_path, "a-seed0", stale=(stale,)), _output(tmp_path, "b-seed0")

    def judge(output):
        if output is second:
            raise TrainingError("b-seed0 finished with other settings")
        return "not done yet"

    with pytest.raises(TrainingError, match="other settings"):
        _stage([first, second], judge=judge)
    assert capsys.readouterr().out == "" and stale.exists()


# --------------------------------------------------------------------------- a full disk


def _disk_full(tmp: Path) -> None:
    Path(tmp).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def test_a_full_disk_in_write_atomic_is_one_line_naming_the_output_and_leaves_nothing_partial(tmp_path):
    target = tmp_path / "data" / "manifest.parquet"
    with pytest.raises(StoreError) as full:
        write_atomic(target, _disk_full)
    assert str(full.value).startswith(f"{target}: no space left on the device") and "\n" not in str(full.value)
    assert "rerun the same command" in str(full.value)
    assert list(target.parent.iterdir()) == []  # neither the output nor its temporary
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(b"whole"))  # space freed: the same call works
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]


def test_a_full_disk_in_atomic_dir_names_the_folder_and_keeps_the_previous_output(tmp_path):
    folder = tmp_path / "cams" / "resnet18-seed0"
    with atomic_dir(folder) as tmp:
        (tmp / StudyStore.CAM_PART).write_bytes(b"previous")
    for failing in (lambda tmp: _disk_full(tmp / StudyStore.CAM_PART),  # the block's own write
                    lambda tmp: write_atomic(tmp / StudyStore.CAM_DONE, _disk_full)):  # a nested atomic write
        with pytest.raises(StoreError, match=f"^{folder}: no space left on the device"):
            with atomic_dir(folder) as tmp:
                failing(tmp)
        assert sorted(p.name for p in folder.parent.iterdir()) == ["resnet18-seed0"]  # no temporary left
        assert (folder / StudyStore.CAM_PART).read_bytes() == b"previous"
    with atomic_dir(folder) as tmp:
        (tmp / StudyStore.CAM_PART).write_bytes(b"next")
    assert (folder / StudyStore.CAM_PART).read_bytes() == b"next"


def test_other_os_errors_keep_their_type(tmp_path):
    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(PermissionError):  # not a full disk: a bug or a setup problem, with its traceback
        write_atomic(tmp_path / "x", denied)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the bucket is the authority


def test_a_pull_drops_mirror_files_the_bucket_lacks_and_fetches_what_differs(s3):
    import boto3

    remote = objectstore.open_remote(f"s3://{BUCKET}/authority/demo")
    with atomic_dir(remote.local / "cams" / "resnet18-seed0") as tmp:  # uploaded as it is renamed into place
        (tmp / StudyStore.CAM_PART).write_bytes(b"maps" * 100)
        write_record(tmp / StudyStore.CAM_DONE, INPUTS)
    write_text_atomic(remote.local / "study.json", "{}")
    assert remote.sync() == objectstore.Synced(0, [])  # the mirror holds what the bucket holds

    client = boto3.client("s3")
    client.delete_object(Bucket=BUCKET, Key="authority/demo/cams/resnet18-seed0/_done.json")
    client.put_object(Bucket=BUCKET, Key="authority/demo/study.json", Body=b"{}")  # another object, same size
    earlier = (remote.local / "study.json").stat().st_mtime - 60
    os.utime(remote.local / "study.json", (earlier, earlier))  # so the mirror's copy is of an older object
    (remote.local / ".lock").write_text("the local lock")  # never a study file
    (remote.local / "ray").mkdir(exist_ok=True)
    (remote.local / "ray" / "state").write_text("Ray's, at the URI")
    (remote.local / "cams" / f".x.tmp-{os.getpid()}").write_text("a writer's temporary")
    synced = remote.sync()
    assert synced.dropped == ["cams/resnet18-seed0/_done.json"] and synced.fetched == 1  # study.json
    record = remote.local / "cams" / "resnet18-seed0" / StudyStore.CAM_DONE
    assert record_reason(record, INPUTS) == "not done yet"
    assert (remote.local / ".lock").is_file() and (remote.local / "ray" / "state").is_file()
    assert (remote.local / "cams" / f".x.tmp-{os.getpid()}").is_file()

    client.delete_object(Bucket=BUCKET, Key="authority/demo/cams/resnet18-seed0/part-00000.parquet")
    assert remote.sync(Path("cams") / "resnet18-seed0").dropped == ["cams/resnet18-seed0/part-00000.parquet"]
    assert not (remote.local / "cams" / "resnet18-seed0").exists()  # emptied by the drop: gone too
    assert remote.pull() == 0


def test_a_bucket_study_prints_its_report_as_the_bucket_uri(s3):
    store = StudyStore(f"s3://{BUCKET}/shown/demo")
    report = store.analysis_dir / "report.html"
    assert store.shown(report) == f"s3://{BUCKET}/shown/demo/analysis/report.html (local copy: {report})"
    assert StudyStore("/tmp/x").shown("/tmp/x/analysis/report.html") == "/tmp/x/analysis/report.html"


# --------------------------------------------------------------------------- through the CLI
# (a truncated maps file and a damaged training output in a finished study, through `camstudy run`:
# tests/e2e/test_study_lifecycle.py, on a copy of the study its SIGTERM scenario finishes)


SHRINK = {"models.names": "[resnet18]", "data.synthetic.n": 60, "data.synthetic.size": 64, "split.n_val": 16,
          "split.n_test": 16, "preprocess.image_size": 32, "recipes.resnet.epochs": 1, "training.batch_size": 16,
          "resources.prepare_actors": 0, "cam.layers": "[final]"}


def _args(stage: str, storage: Path) -> list[str]:
    sets = [item for key, value in {**SHRINK, "storage": storage}.items() for item in ("--set", f"{key}={value}")]
    return [stage, "configs/demo.yaml", *sets]


def test_a_full_disk_ends_the_command_in_one_line_and_the_same_command_then_finishes(tmp_path, monkeypatch, capsys):
    from orchestrator import cli

    monkeypatch.chdir(ROOT)
    storage = tmp_path / "store"
    written = pd.DataFrame.to_parquet

    def full_for_the_manifest(frame, path, *args, **kwargs):
        if Path(path).name.startswith(".manifest.parquet.tmp-"):
            _disk_full(Path(path))
        return written(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_for_the_manifest)
    assert cli.main(_args("prepare", storage)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    manifest = storage / "demo" / "data" / "manifest.parquet"
    assert err[-1].startswith(f"camstudy: error: {manifest}: no space left on the device") and "Traceback" not in err
    assert not manifest.exists() and not list((storage / "demo").rglob(".*.tmp-*"))
    assert not (storage / "demo" / "stages" / "prepare.json").exists()

    monkeypatch.setattr(pd.DataFrame, "to_parquet", written)  # space freed
    assert cli.main(_args("prepare", storage)) == 0
    assert manifest.is_file() and "manifest.parquet" in str(read_record(storage / "demo" / "stages" / "prepare.json"))


def test_faithfulness_and_robustness_feed_the_explain_inputs_only():
    """docs/STUDY.md §11: their keys recompute every run's maps; other stages' inputs do not move; a
    section turned off is its `enabled` alone, so its other keys then change nothing."""
    import dataclasses

    from study.config import StudyConfig
    from study.records import baselines_inputs, changed_keys, explain_inputs, fingerprint, prepare_inputs

    config = StudyConfig()
    fewer = dataclasses.replace(config, faithfulness=dataclasses.replace(config.faithfulness, steps=(20.0, 80.0)))
    assert fingerprint(explain_inputs(fewer, "t")) != fingerprint(explain_inputs(config, "t"))
    assert changed_keys(explain_inputs(config, "t"), explain_inputs(fewer, "t")) == ["faithfulness.steps"]
    assert prepare_inputs(fewer) == prepare_inputs(config) and baselines_inputs(fewer) == baselines_inputs(config)
    off = dataclasses.replace(config, robustness=dataclasses.replace(config.robustness, enabled=False))
    assert explain_inputs(off, "t")["robustness"] == {"enabled": False}
    off_fewer = dataclasses.replace(off, robustness=dataclasses.replace(off.robustness, n=3))
    assert explain_inputs(off_fewer, "t") == explain_inputs(off, "t")
