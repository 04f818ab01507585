"""A search on a multi-node Ray cluster with its run on a real local S3 server, no shared disk.

The S3 server is ``moto``'s standalone server, in this process on a free port. The cluster is
``ray.cluster_utils.Cluster`` (a head and two worker nodes) in a host subprocess whose nodes see
an unusable ``$AUTOCOMPRESS_CACHE`` (no teacher or data can be read from a local disk there).
The driver is a real ``autocompress run --run-dir s3://...`` process joining the cluster; it is
SIGKILLed mid-run, and a second driver with an empty cache and another working directory (a
fresh machine) resumes from the URI alone. Then: every trial's artifact is in the bucket, the
invariants of :func:`rkit.check_run` hold on a copy of the bucket (0 trials lost), and the front
loads from the bucket after every local directory of the run is deleted.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from rkit import TALLY, Driver, artifact_hashes, check_run, cli, records, write_experiment

pytestmark = pytest.mark.slow
TRIALS = 8
BUCKET = "autocompress-runs"

CLUSTER = textwrap.dedent(
    """
    import threading
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print("ADDRESS", cluster.address, flush=True)
    threading.Event().wait()  # until the test kills this process and its nodes
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on a free port, with one bucket; ``AWS_*`` point every child at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def _keys(prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3")
    out: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _n_records(prefix: str) -> int:
    """Finished trial records in the bucket (not the adoption pool, not temporary claims)."""
    names = [k.removeprefix(f"{prefix}/records/") for k in _keys(f"{prefix}/records/")]
    return sum(1 for n in names if n.endswith(".json") and "/" not in n and n[0] != ".")


def _download(uri: str, to: Path) -> Path:
    from autocompress.search._storage import Remote

    remote = Remote(uri)
    for name in remote.entries():
        remote.download(name, to / name)
    return to


def test_object_store_run_on_a_cluster_killed_then_resumed_from_the_uri(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{BUCKET}/runs/kill-resume"
    exp = write_experiment(tmp_path / "exp.yaml", trials=TRIALS, keep_artifacts="all")
    host = Driver(
        [sys.executable, "-c", CLUSTER],
        tmp_path / "cluster.log",
        cwd=tmp_path,
        AUTOCOMPRESS_CACHE="/proc/no-local-disk-here",  # a trial reading a cache would fail
    )
    try:
        address = host.poll_until(
            lambda: next(
                (ln.split()[1] for ln in host.output().splitlines() if ln.startswith("ADDRESS")),
                None,
            ),
            180,
            "the cluster to start",
            0.5,
        )
        args = [*cli(), "run", str(exp), "--run-dir", uri, "--address", address]
        (tmp_path / "a").mkdir()
        first = Driver(
            args,
            tmp_path / "first.log",
            cwd=tmp_path / "a",
            AUTOCOMPRESS_CACHE=str(tmp_path / "c1"),
        )
        try:
            prefix = uri.removeprefix(f"s3://{BUCKET}/")
            first.poll_until(lambda: _n_records(prefix) >= 3, 600, "3 records in the bucket", 0.5)
            first.signal(signal.SIGKILL)
            first.wait(60)
        finally:
            first.close()
        TALLY["faults injected"] += 1
        before_dir = _download(uri, tmp_path / "before")
        before, arts_before = records(before_dir), artifact_hashes(before_dir)
        assert len(before) >= 3 and not (before_dir / "result.json").exists()

        (tmp_path / "b").mkdir()  # a fresh driver machine: empty cache, another directory
        second = Driver(
            [*args, "--resume"],
            tmp_path / "second.log",
            cwd=tmp_path / "b",
            AUTOCOMPRESS_CACHE=str(tmp_path / "c2"),
        )
        try:
            rc = second.wait(900)
            assert rc == 0, second.output()[-3000:]
        finally:
            second.close()
        TALLY["runs resumed"] += 1
        assert f"report: {uri}/report.html" in second.output()
    finally:
        host.close()

    # the finished run, from a copy of the bucket: 0 trials lost, nothing run twice
    after = _download(uri, tmp_path / "after")
    counts = check_run(after, TRIALS, before, arts_before)
    assert counts["kept"] >= 3
    assert (after / "report.html").is_file() and (after / "optuna.journal").is_file()
    assert not list(after.glob("tune")), "Ray Tune's pickled state stays on the driver"
    # every trial's artifact is in the bucket (keep_artifacts: all)
    from autocompress.search import SearchResult

    t = SearchResult.load(after).trials
    done = t[(t["status"] == "COMPLETE") & (t["duplicate_of"] == "")]
    assert len(done) >= TRIALS - 1
    for art in done["artifact"]:
        assert (after / art / "manifest.json").is_file(), art

    # the front loads from the bucket alone: every local directory of the run is gone
    for d in ("c1", "c2", "before", "after", "a", "b"):
        shutil.rmtree(tmp_path / d)
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "reader"))
    from autocompress.artifacts import load

    res = SearchResult.load(uri)
    assert res.source == uri and len(res.pareto) >= 1
    for tid in res.pareto["trial_id"]:
        path = res.artifact_path(tid)
        assert path.is_relative_to(tmp_path / "reader")
        load(path)  # sizes and sha256 verified
    other = next(iter(set(done["trial_id"]) - set(res.pareto["trial_id"])), None)
    if other is not None:  # a non-front artifact is downloaded when asked for
        load(res.artifact_path(other))

    # the command line reads the URI too
    from typer.testing import CliRunner

    from autocompress.cli import app

    runner = CliRunner()
    front = str(res.pareto["trial_id"].iloc[0])
    listed = runner.invoke(app, ["trials", uri, "--front"])
    assert listed.exit_code == 0 and front in listed.output, listed.output
    out = tmp_path / "exported"
    got = runner.invoke(app, ["export", uri, "--trial", front, "--out", str(out)])
    assert got.exit_code == 0, got.output
    load(out)
    rep = runner.invoke(app, ["report", uri])
    assert rep.exit_code == 0 and f"{uri}/report.html" in rep.output, rep.output
