"""The run directory: read-only and full disks, no unpickling, damaged files, interrupted writes.

Disks: tests run as root, where ``chmod`` does not stop writes, so a real read-only or tiny
file system is mounted in a private mount namespace (``unshare -m``, invisible to every other
process and gone when the driver exits). Where that is not permitted the tests are skipped and
the free-space check is exercised with a given free-byte count instead.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rkit import ROOT, check_run, cli, env, wait_for, write_experiment

from autocompress.artifacts import load
from autocompress.errors import ArtifactError, AutocompressError, ConfigError
from autocompress.search import SearchResult
from autocompress.search._checks import check_free_space, prepare_run_dir, space_needed


def _can_mount() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


MOUNT = pytest.mark.skipif(not _can_mount(), reason="cannot mount a tmpfs in a mount namespace")


def _in_namespace(mount: str, command: list[str]) -> list[str]:
    """``command`` run in a private mount namespace after running the shell snippet ``mount``."""
    quoted = " ".join(f"'{c}'" for c in command)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mount} && exec {quoted}"]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@MOUNT
@pytest.mark.parametrize("disk", ["read-only", "nearly-full"])
def test_unusable_disk_fails_early_with_a_clear_message(tmp_path: Path, disk: str, tally) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", trials=20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if disk == "read-only":
        snippet = f"mount -t tmpfs -o size=64m,ro tmpfs {mnt}"
        expect = f"run_dir '{mnt}/run' is not writable (Read-only file system): choose another"
    else:
        snippet = f"mount -t tmpfs -o size=4m tmpfs {mnt}"
        expect = f"run_dir '{mnt}/run' has 4.0 MB free but this run needs about"
    t0 = time.monotonic()
    proc = subprocess.run(
        _in_namespace(snippet, [*cli(), "run", str(exp), "--run-dir", f"{mnt}/run"]),
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
        cwd=tmp_path,
    )
    took = time.monotonic() - t0
    tally["faults injected"] += 1
    assert expect in _one_error_line(proc)
    assert (
        "free some space or choose a run_dir on another disk" in proc.stderr
        or disk != "nearly-full"
    )
    assert took < 60  # before the teacher is exported and before Ray starts
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_free_space_check_without_a_real_disk(tmp_path: Path) -> None:
    need = space_needed(200_000, 50)
    assert need > 16 << 20
    check_free_space(tmp_path, need, free=need)
    with pytest.raises(ConfigError, match=r"has 1\.0 MB free but this run needs about 20\.3 MB"):
        check_free_space(tmp_path, need, free=1 << 20)


FILL = """
import subprocess, sys, time, pathlib
rd, fill = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
drv = subprocess.Popen(sys.argv[3:])
deadline = time.monotonic() + 900
while len(list((rd / "records").glob("*.json"))) < 2 and drv.poll() is None:
    if time.monotonic() > deadline:
        drv.kill()
        sys.exit("timed out waiting for 2 records")
    time.sleep(0.05)
with open(fill, "wb") as f:  # fill the disk until it is full
    try:
        while True:
            f.write(b"\\0" * (1 << 20))
            f.flush()
    except OSError:
        pass
sys.exit(drv.wait())
"""


@MOUNT
@pytest.mark.slow
def test_disk_full_then_freed_resume_keeps_everything(tmp_path: Path, tally) -> None:
    """Fill the disk mid-run: a clear error; free it and resume (same namespace): nothing lost."""
    exp = write_experiment(tmp_path / "exp.yaml", trials=6, epochs=4, keep_artifacts="all")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rd = mnt / "run"
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(FILL))
    keep = tmp_path / "kept"
    inner = textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size=40m tmpfs {mnt}
        {sys.executable} {script} {rd} {mnt}/filler {" ".join(cli())} run {exp} --run-dir {rd}
        echo "first=$?"
        rm -f {mnt}/filler
        {" ".join(cli())} run {exp} --run-dir {rd} --resume
        echo "second=$?"
        cp -r {rd} {keep}
    """)
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
        env=env(),
        cwd=tmp_path,
    )
    tally["faults injected"] += 1
    tally["runs resumed"] += 1
    out = proc.stdout
    assert "first=0" not in out and "second=0" in out, out[-4000:]
    first = out[: out.index("first=")]
    errors = [ln for ln in first.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in first and "│" not in first, first[-4000:]
    assert "failed (database or disk is full)" in errors[0] or "No space left" in errors[0]
    assert errors[0].endswith("then continue with --resume (resume=True); finished trials are kept")
    check_run(keep, 6)


# --- nothing under run_dir is unpickled by autocompress ----------------------------------------
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_autocompress_source_never_unpickles() -> None:
    """Static check: no pickle-family import, no torch.load, no allow_pickle=True, no read_pickle.

    (Ray Tune's own restore unpickles its state under run_dir/tune: see docs/reliability.md.)
    """
    bad = []
    for path in sorted((ROOT / "autocompress").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in UNPICKLERS for n in names):
                    bad.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "load"):
                base = ast.unparse(node.value)
                if node.attr == "read_pickle" or base in ("torch", "pickle", "joblib"):
                    bad.append(f"{path.name}:{node.lineno} {base}.{node.attr}")
            off = isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant)
            off = off and node.value.value is False
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not off:
                bad.append(f"{path.name}:{node.lineno} allow_pickle")
            if isinstance(node, ast.keyword) and node.arg == "weights_only":
                bad.append(f"{path.name}:{node.lineno} weights_only (torch.load)")
    assert not bad, bad


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling in this process raises (pickle and the libraries built on it)."""
    import pickle

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    import numpy as np

    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: real(*a, **{**k, "allow_pickle": False}))


def _finished_run(tmp_path: Path) -> Path:
    exp = write_experiment(tmp_path / "exp.yaml", trials=2, epochs=1, keep_artifacts="all")
    proc = subprocess.run(
        [*cli(), "run", str(exp), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "run"


def test_run_dir_files_are_plain_data_and_damage_is_refused(
    tmp_path: Path, no_unpickling, tally
) -> None:
    rd = _finished_run(tmp_path)
    res = SearchResult.load(rd)  # tables, result.json, records: all plain data
    for tid in res.trials["trial_id"]:
        res.load_model(tid)  # artifacts: safetensors + JSON, sha256-verified
    kinds = {}
    for p in rd.rglob("*"):
        if p.is_file() and "tune" not in p.relative_to(rd).parts:
            kinds.setdefault(p.suffix, []).append(p.name)
    assert set(kinds) <= {".json", ".csv", ".safetensors", ".journal", ".html", ".png"}, kinds
    for line in (rd / "optuna.journal").read_text().splitlines():  # the study: JSON lines
        assert isinstance(json.loads(line), dict)
    for p in rd.rglob("*"):  # only Tune's own state is a pickle
        if p.is_file() and p.read_bytes()[:1] == b"\x80":
            assert "tune" in p.relative_to(rd).parts, p

    from autocompress.search._trial import MAX_RECORD_BYTES, read_records

    tid = res.trials["trial_id"].iloc[0]
    rec_path = rd / "records" / f"{tid}.json"
    good = rec_path.read_bytes()
    for damage in (good[: len(good) // 2], b"[1, 2]", b'{"trial_id": 5}', b"\x80\x04K\x01."):
        rec_path.write_bytes(damage)
        assert tid not in read_records(rd)  # ignored, never trusted or unpickled
    rec_path.write_bytes(b" " * (MAX_RECORD_BYTES + 1))
    assert tid not in read_records(rd)
    rec_path.write_bytes(good)
    tally["bad inputs tried"] += 5

    result = rd / "result.json"
    text = result.read_bytes()
    for damage in (text[:10], b"[]", b"{}", b'{"_version": 999, "teacher": {}, "objective": {}}'):
        result.write_bytes(damage)
        with pytest.raises(AutocompressError) as e:
            SearchResult.load(rd)
        assert "\n" not in str(e.value)
    tally["bad inputs tried"] += 4

    art = res.artifact_path(tid)
    weights = art / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors has"):
        res.load_model(tid)
    tally["bad inputs tried"] += 1


# --- artifact writes killed at random moments ---------------------------------------------------
WRITER = """
import sys, torch, pathlib
from autocompress.artifacts import export
from autocompress.spaces import Plan
out = pathlib.Path(sys.argv[1])
torch.manual_seed(0)
models = [torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 10)) for _ in range(2)]
(out / "ready").write_text("")
i = 0
while True:
    export(models[i % 2], Plan(), out / "art", task_spec=None)
    i += 1
"""


def test_artifact_writes_killed_at_random_moments_never_look_valid(tmp_path: Path, tally) -> None:
    """SIGKILL a process that keeps rewriting one artifact: it loads exactly, or is refused."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 10)) for _ in "ab"]
    expected = [m.state_dict() for m in models]
    rng = random.Random(0)
    outcomes = {"valid": 0, "refused": 0}
    for i in range(6):
        out = tmp_path / f"w{i}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env())
        try:
            wait_for(lambda out=out: (out / "ready").exists(), 120, "the writer to start")
            wait_for(lambda out=out: (out / "art").exists(), 120, "the first export")
            time.sleep(rng.uniform(0.0, 0.4))  # the fault's moment is random, by design
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        tally["faults injected"] += 1
        try:
            model = load(
                out / "art",
                model=torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.Linear(300, 10)),
            )
        except ArtifactError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        state = model.state_dict()
        assert any(all(torch.equal(state[k], exp[k]) for k in exp) for exp in expected)
        outcomes["valid"] += 1
    assert outcomes["valid"] >= 1, outcomes
    leftovers = [p.name for i in range(6) for p in (tmp_path / f"w{i}").iterdir()]
    assert all(n in ("ready", "art") or n.startswith(".") for n in leftovers)
    print(f"\nartifact writes killed: {outcomes}")


def test_prepare_run_dir_resume_after_a_startup_kill(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    (rd / "teacher").mkdir(parents=True)
    (rd / "teacher" / "weights.safetensors").write_bytes(b"partial")
    (rd / ".run.json.tmp").write_text("{")
    got = prepare_run_dir(rd, resume=True)
    assert got == rd and not any(rd.iterdir())  # started afresh, nothing stale kept
    (rd / "other").write_text("x")
    with pytest.raises(ConfigError, match="holds no run .no run.json. and other files"):
        prepare_run_dir(rd, resume=True)
    with pytest.raises(ConfigError, match="holds no run"):
        prepare_run_dir(tmp_path / "nowhere", resume=True)
    with pytest.raises(ConfigError, match="is a file"):
        prepare_run_dir(rd / "other", resume=False)
