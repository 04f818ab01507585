"""Imported by Ray workers of the cluster test: a metric that records which node ran it."""

from __future__ import annotations

import os
from pathlib import Path


def node_probe(model, artifact, task) -> float:
    """Append this worker's Ray node id to $NODE_PROBE_FILE; always 0 (a satisfied constraint)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    with Path(os.environ["NODE_PROBE_FILE"]).open("a") as f:
        f.write(node + "\n")
    return 0.0


node_probe.direction = "minimize"
