"""Multi-node, proven on one machine: a Ray cluster of a CPU-less head and two one-CPU worker
nodes (`ray.cluster_utils.Cluster`), and `camstudy run` joining it through RAY_ADDRESS as under
`ray job submit`. Two runs that train at once must land on different nodes, each recording the
node it trained on (done.json, the `camstudy.node` tag of its MLflow child), and the explain
actors must spread over both nodes too; the results must be complete."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

STUDY = ["--set", "models.names=[resnet18,resnet34]", "--set", "data.synthetic.n=60", "--set", "split.n_val=12",
         "--set", "split.n_test=16", "--set", "preprocess.image_size=32", "--set", "recipes.resnet.epochs=1",
         "--set", "sanity.cascade=false", "--set", "cam.layers=[final]",
         # batches of 2 rows: many more batches than actors, so work reaches both once both are up
         # (with one or two batches per run, the actor that freed first could take them all)
         "--set", "cam.batch_size=2"]

CLUSTER = textwrap.dedent("""
    import json, os, subprocess, sys
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator", "run", "configs/demo.yaml", *sys.argv[2:]],
                              env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True)
        print(done.stdout[-6000:], done.stderr[-6000:], sep="\\n")
        with open(sys.argv[1], "w") as out:
            json.dump({"returncode": done.returncode, "workers": [node.node_id for node in workers],
                       "head": cluster.head_node.node_id}, out)
    finally:
        cluster.shutdown()
""")


def test_runs_and_explain_actors_spread_over_the_nodes(tmp_path):
    result, study = tmp_path / "cluster.json", tmp_path / "store" / "demo"
    done = subprocess.run([sys.executable, "-c", CLUSTER, str(result), "--set", f"storage={tmp_path / 'store'}",
                           *STUDY], cwd=ROOT, capture_output=True, text=True, timeout=1100)
    assert result.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    cluster = json.loads(result.read_text())
    assert cluster["returncode"] == 0, done.stdout[-4000:]
    trained_on = {run: json.loads((study / "train" / f"{run}-seed0" / "done.json").read_text())["node"]["ray_node_id"]
                  for run in ("resnet18", "resnet34")}
    assert set(trained_on.values()) == set(cluster["workers"]), trained_on  # one run on each worker node
    explained_on = set()
    for run in ("resnet18", "resnet34"):
        record = json.loads((study / "cams" / f"{run}-seed0" / "_done.json").read_text())
        assert record["rows"] > 0
        explained_on |= set(record["nodes"])
    assert explained_on == set(cluster["workers"]), explained_on
    assert (study / "analysis" / "report.html").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    children = [run for run in client.search_runs([client.get_experiment_by_name("camstudy").experiment_id])
                if run.data.tags.get("camstudy.role") == "child"]
    assert {run.data.tags["camstudy.node"] for run in children} == set(cluster["workers"])
