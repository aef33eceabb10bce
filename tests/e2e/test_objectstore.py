"""Studies in object storage (study/objectstore.py): `storage: s3://...` against a local
S3-compatible server (moto's server mode, started on 127.0.0.1 and stopped by the test): every
output lands in the bucket, a fresh mirror resumes from the bucket alone, a killed study resumes,
the lock refuses a second writer and takes over from a dead one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT
from tests.e2e.camstudy_cli import SECTION_11_OFF, as_sets

BUCKET = "camstudy-test"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SHRINK = ["--set", "models.names=[resnet18]", "--set", "data.synthetic.n=60", "--set", "split.n_val=12",
          "--set", "split.n_test=16", "--set", "preprocess.image_size=32", "--set", "recipes.resnet.epochs=2",
          "--set", "cam.layers=[final]", "--set", "training.batch_size=16",
          *as_sets(SECTION_11_OFF)]
EPOCHS = ["--set", "recipes.resnet.epochs=4"]  # the killed study: time to be killed after its first


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS settings every process reads."""
    moto = pytest.importorskip("moto.server", reason="moto[server] is a test extra")
    boto3 = pytest.importorskip("boto3")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "CAMSTUDY_STAGING": str(tmp_path_factory.mktemp("staging")),
           "CAMSTUDY_LOCK_STALE_S": "20"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    server.stop()


def keys(prefix: str) -> set[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}


def run(storage: str, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--set",
                           f"storage={storage}", *SHRINK, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def mirror(env: dict, storage: str) -> Path:
    return Path(env["CAMSTUDY_STAGING"]) / "s3" / storage[len("s3://"):] / "demo"


@pytest.fixture(scope="module")
def killed_and_resumed(s3):
    """A study killed mid-training (SIGKILL, its lock left behind) and resumed on a fresh mirror
    (another machine: nothing local) from the bucket's checkpoint, then run on a third fresh
    mirror; what each step left, for the test below. Its final bucket and mirror are also the
    finished study test_an_emptied_bucket_... copies instead of running one of its own."""
    storage = f"s3://{BUCKET}/killed"
    log = Path(s3["CAMSTUDY_STAGING"]) / "killed.log"
    started = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", "--set",
                                    f"storage={storage}", *SHRINK, *EPOCHS], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600
    while " epoch 1: " not in log.read_text():
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # a worker uploads its checkpoint before it reports the epoch
    process.wait()
    after_kill = keys("killed/demo/")
    shutil.rmtree(mirror(s3, storage))
    again = run(storage, *EPOCHS)
    elapsed = time.time() - started
    done = mirror(s3, storage) / "train" / "resnet18-seed0" / "done.json"
    history = [e["epoch"] for e in json.loads(done.read_text())["history"]] if done.is_file() else None
    stored = keys("killed/demo/")
    shutil.rmtree(mirror(s3, storage))
    third = run(storage, *EPOCHS)
    return SimpleNamespace(storage=storage, after_kill=after_kill, again=again, elapsed=elapsed, history=history,
                           stored=stored, third=third)


def test_a_killed_study_resumes_from_the_bucket_alone_and_every_output_lands_there(killed_and_resumed):
    """Killed mid-training, the study resumes on a fresh mirror from the bucket's checkpoint; then
    every output is in the bucket, and a third fresh mirror finds every stage up to date."""
    study = killed_and_resumed
    assert "train/resnet18-seed0/checkpoint.pt" in study.after_kill
    again = study.again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "took over the lock of a command that is gone" in again.stdout  # the dead driver's lock
    assert study.history == [1, 2, 3, 4]
    assert "resnet18-seed0 epoch 1:" not in again.stdout  # epoch 1 came from the bucket's checkpoint

    stored = study.stored
    for expected in ("study.json", "config.yaml", "data/manifest.parquet", "data/cache/images.npy",
                     "data/cache/index.parquet", "train/resnet18-seed0/done.json", "train/resnet18-seed0/model.pt",
                     "train/resnet18-seed0/predictions.parquet", "cams/resnet18-seed0/part-00000.parquet",
                     "cams/resnet18-seed0/_done.json", "cams/resnet18-seed0/_tuning.json",
                     "sanity/resnet18-seed0/part-00000.parquet", "baselines/_done.json", "stages/prepare.json",
                     "stages/analyze.json", "analysis/report.html", "analysis/scores.parquet",
                     "analysis/statistics.json", "mlflow.db", "camstudy.log"):
        assert expected in stored, expected
    assert not [key for key in stored if ".tmp-" in key]  # only complete files
    assert not any(key.endswith("checkpoint.pt") for key in stored)  # removed when the run finished
    assert any(key.startswith("ray/") for key in stored)  # Ray Train's own state, at the URI
    print(f"\ntiny study into S3 (moto on 127.0.0.1), killed and resumed on a fresh mirror: {study.elapsed:.0f} s, "
          f"{len(stored)} objects")

    third = study.third
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    out = third.stdout
    assert "file(s) pulled into the local mirror" in out
    assert "[prepare] up to date" in out and "resnet18-seed0: finished earlier, skipped" in out
    assert "[explain] resnet18-seed0: up to date, skipped" in out and "[analyze] up to date" in out


def test_the_lock_refuses_a_live_writer_in_one_line(s3):
    import boto3

    storage = f"s3://{BUCKET}/locked"
    holder = {"host": "another-host", "pid": 4242, "command": "camstudy run configs/demo.yaml",
              "started": "2026-12-06T08:00:00+0000", "heartbeat": time.time() + 600, "token": "x"}
    boto3.client("s3").put_object(Bucket=BUCKET, Key="locked/demo/.lock", Body=json.dumps(holder).encode())
    refused = run(storage, timeout=300)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("camstudy: error: s3://camstudy-test/locked/demo: another camstudy command")
    assert "PID 4242 on another-host" in line


def test_a_storage_uri_that_cannot_be_used_is_one_line(s3):
    refused = subprocess.run([sys.executable, "-m", "orchestrator", "prepare", "configs/demo.yaml", "--set",
                              "storage=ftp://host/x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is not an object store camstudy can use" in refused.stderr


def test_an_emptied_bucket_is_the_authority_over_a_warm_mirror(s3, killed_and_resumed):
    """A study run once, then its bucket emptied (as a new server with an empty bucket of the same
    name would be): the next run does not report its stages up to date from the node-local mirror;
    it drops the mirror's files, says so, redoes every stage and leaves the outputs in the bucket.
    The report is printed as its bucket URI."""
    import boto3

    storage = f"s3://{BUCKET}/emptied"
    # the study run once: the finished one above, copied to this URI (its objects and its mirror)
    assert killed_and_resumed.third.returncode == 0, "the study to copy did not finish"
    client = boto3.client("s3")
    for key in keys("killed/"):
        client.copy_object(Bucket=BUCKET, CopySource={"Bucket": BUCKET, "Key": f"killed/{key}"}, Key=f"emptied/{key}")
    shutil.copytree(mirror(s3, killed_and_resumed.storage), mirror(s3, storage), ignore=shutil.ignore_patterns(".lock"))
    assert keys("emptied/") == keys("killed/")
    stored = sorted(f"emptied/{key}" for key in keys("emptied/"))
    for start in range(0, len(stored), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key} for key in stored[start:start + 1000]]})
    assert not keys("emptied/") and (mirror(s3, storage) / "cams" / "resnet18-seed0" / "_done.json").is_file()

    again = run(storage, "--set", "recipes.resnet.epochs=1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout
    assert "mirror file(s) not in the bucket, dropped from the mirror" in out and "will be redone" in out
    assert "up to date" not in out and "finished earlier, skipped" not in out, out[-3000:]
    assert "[prepare] not done yet" in out and "[analyze] not done yet; analysing" in out
    assert "[explain] resnet18-seed0: not done yet; computing its heatmaps" in out
    assert f"[run] report: s3://{BUCKET}/emptied/demo/analysis/report.html (local copy: " in out
    stored = keys("emptied/demo/")
    for expected in ("study.json", "data/manifest.parquet", "stages/prepare.json", "train/resnet18-seed0/done.json",
                     "train/resnet18-seed0/predictions.parquet", "cams/resnet18-seed0/part-00000.parquet",
                     "cams/resnet18-seed0/_done.json", "baselines/_done.json", "analysis/report.html",
                     "stages/analyze.json", "mlflow.db"):
        assert expected in stored, expected
