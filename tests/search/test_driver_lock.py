"""One driver per run directory: real processes, synchronized on FIFOs (no sleeps)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from autocompress.errors import ConfigError
from autocompress.search._checks import LOCK_FILE, RunLock, check_not_in_use

TIMEOUT = 600
GATE = """
from pathlib import Path

HERE = Path(__file__).parent


def gate(model, artifact, task):
    \"\"\"Blocks the first trial (not the teacher's scoring) until the test releases it.\"\"\"
    if "teacher" in str(artifact.path) or (HERE / "released").exists():
        return 1.0
    with open(HERE / "started", "w") as f:  # a FIFO: waits for the test to listen
        f.write("a trial is running\\n")
    with open(HERE / "release") as f:  # a FIFO: waits for the test to let go
        f.read()
    return 1.0
"""
HOLD = """
import sys
from pathlib import Path
from autocompress.search._checks import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("autocompress")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "autocompress.cli"]


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def _refused(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_second_driver_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    (tmp_path / "lock_gate.py").write_text(GATE)
    os.mkfifo(tmp_path / "started")
    os.mkfifo(tmp_path / "release")
    exp = {
        "task": "digits-mlp",
        "space": {"knobs": {"sparsity": [0.5, 0.9], "bits": [4, 8]}},
        "finetune": {"epochs": 1},
        "objective": {"metrics": ["accuracy", "size_bytes", "lock_gate:gate:maximize"]},
        "search": {"trials": 1, "workers": 1},
    }
    (tmp_path / "exp.yaml").write_text(json.dumps(exp))
    rd = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [*_script(), "run", "exp.yaml", "--run-dir", str(rd)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        heard: list[str] = []
        listener = _in_thread(lambda: heard.append((tmp_path / "started").read_text()))
        listener.join(TIMEOUT)  # returns once the first driver's trial is running
        assert heard, (tmp_path / "first.log").read_text()[-3000:]
        for extra in ([], ["--resume"]):
            line = _refused(
                [*_script(), "run", "exp.yaml", "--run-dir", str(rd), *extra], tmp_path, env
            )
            assert "is in use by another autocompress driver" in line, line
            assert f"pid {first.pid} on {socket.gethostname()}, started 20" in line, line
        (tmp_path / "released").write_text("")
        (tmp_path / "release").write_text("go")  # blocks until the trial listens
        assert first.wait(TIMEOUT) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert (rd / "pareto.csv").is_file() and not (rd / LOCK_FILE).exists()


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
            check_not_in_use(tmp_path)
        with pytest.raises(ConfigError, match="wait for it to finish or stop it"):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # a killed driver leaves the file, not the lock
    check_not_in_use(tmp_path)
    lock = RunLock.acquire(tmp_path)
    check_not_in_use(tmp_path)  # this process holds it: its own checks pass
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
