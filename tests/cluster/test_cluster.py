"""A search joins a real multi-node Ray cluster by address (``ray.cluster_utils.Cluster``).

Runs in a subprocess so the cluster never meets the in-process Ray of other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from autocompress.search._tables import read_csv

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import sys
    from ray.cluster_utils import Cluster
    from autocompress import FinetuneSettings, get_task
    from autocompress.objectives import Objective
    from autocompress.search import run
    from autocompress.spaces import CompressionSpace, Knobs

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        task = get_task("digits-mlp")
        space = CompressionSpace.from_model(
            task.teacher(), Knobs(sparsity=(0.5, 0.9), bits=(4, 8)),
            finetune=FinetuneSettings(epochs=2),
        )
        objective = Objective(
            ["accuracy", "size_bytes", "cluster_probe:node_probe"], ["accuracy_drop <= 0.05"]
        )
        result = run(task, space, objective, trials=9, workers=3, address=cluster.address,
                     run_dir=sys.argv[1], progress=False)
        print("TRIALS", len(result.trials))
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_search_runs_on_every_node_of_a_real_cluster(tmp_path: Path) -> None:
    probe = tmp_path / "nodes.txt"
    env = {
        **os.environ,
        "NODE_PROBE_FILE": str(probe),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "RAY_AUTH_MODE": "disabled",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRIALS 9" in out.stdout
    trials = read_csv(tmp_path / "run" / "trials.csv")
    assert len(trials) == 9 and (trials["status"] == "COMPLETE").sum() >= 8
    nodes = set(probe.read_text().split())
    assert len(nodes) >= 2, f"all trials ran on one node: {nodes}"
