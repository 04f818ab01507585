"""Where a run lives (``search/_storage.py``): URI parsing, one-line refusals, records and
artifacts on a real local S3 server (``moto``'s, in this process), local paths unchanged."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autocompress.errors import AutocompressError, ConfigError
from autocompress.search._checks import check_run_dir
from autocompress.search._storage import Remote, is_uri, locate, open_run
from autocompress.search._trial import (
    adopt,
    plan_key,
    read_record,
    read_records,
    stub_record,
    write_record,
)

BUCKET = "unit-runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on a free port with one bucket; ``AWS_*`` point pyarrow at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        try:
            yield f"s3://{BUCKET}"
        finally:
            server.stop()


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# --- parsing -----------------------------------------------------------------------------------
def test_local_paths_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert locate("runs/x") == (tmp_path / "runs" / "x").resolve()
    assert locate(tmp_path / "y") == tmp_path / "y"
    assert locate(f"file://{tmp_path}/z") == tmp_path / "z"
    assert check_run_dir("runs/x", False) == (tmp_path / "runs" / "x").resolve()
    assert not is_uri(tmp_path) and not is_uri("runs/x") and not is_uri(f"file://{tmp_path}")
    rec = {**stub_record("t1", "{}"), "status": "COMPLETE"}
    write_record(tmp_path, rec)  # the local record path: temp file + rename, as before
    assert json.loads((tmp_path / "records" / "t1.json").read_text())["trial_id"] == "t1"
    assert read_record(tmp_path, "t1")["status"] == "COMPLETE"
    assert not (tmp_path / "s3:").exists()


def test_uris_are_parsed_without_contacting_anything() -> None:
    remote = locate("s3://some-bucket/runs/a?region=eu-west-1")
    assert isinstance(remote, Remote) and remote.scheme == "s3"
    assert remote.filesystem()[1] == "some-bucket/runs/a"
    mem = locate("memory://bucket/run")  # no pyarrow filesystem: fsspec's is used
    assert isinstance(mem, Remote) and mem.filesystem()[1].endswith("bucket/run")


@pytest.mark.parametrize(
    ("run_dir", "words"),
    [
        ("nosuch://bucket/run", "the scheme 'nosuch' is not supported"),
        ("s3:/bucket/run", "lost a slash"),
    ],
)
def test_unsupported_or_mangled_uri_is_refused_in_one_line(run_dir: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        locate(run_dir)
    assert words in _one_line(e)


def test_cli_refuses_an_unknown_scheme_and_makes_no_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress.cli import app

    monkeypatch.chdir(tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"task": "digits-mlp", "search": {"trials": 2}}))
    res = CliRunner().invoke(app, ["run", str(exp), "--run-dir", "nosuch://bucket/run"])
    assert res.exit_code != 0
    assert "the scheme 'nosuch' is not supported" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_search_run_refuses_an_unknown_scheme_before_anything_runs(
    digits_mlp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocompress.search import run
    from autocompress.spaces import CompressionSpace, Knobs

    monkeypatch.chdir(tmp_path)
    space = CompressionSpace.from_model(digits_mlp.teacher(), Knobs(bits=(4, 8)))
    with pytest.raises(ConfigError) as e:
        run(digits_mlp, space, trials=2, run_dir="s3:/bucket/run", progress=False)
    assert "lost a slash" in _one_line(e)
    assert list(tmp_path.iterdir()) == []


# --- reaching the storage ----------------------------------------------------------------------
def test_missing_bucket_is_one_line(s3: str) -> None:
    with pytest.raises(ConfigError) as e:
        Remote("s3://no-such-bucket/run").check_access()
    assert "the bucket 'no-such-bucket' does not exist" in _one_line(e)


def test_unreachable_endpoint_is_one_line(s3: str) -> None:
    port = _free_port()  # nothing listens there
    uri = f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{port}&scheme=http"
    with pytest.raises(ConfigError) as e:
        Remote(uri).check_access()
    assert "cannot be used" in _one_line(e) and "endpoint" in str(e.value)


def test_refused_credentials_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 endpoint that answers 403 to everything (what S3 says to unknown keys)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Deny(BaseHTTPRequestHandler):
        def _deny(self) -> None:
            body = b"<Error><Code>InvalidAccessKeyId</Code><Message>no</Message></Error>"
            self.send_response(403)
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    try:
        uri = f"s3://b/run?endpoint_override=127.0.0.1:{server.server_port}&scheme=http"
        with pytest.raises(ConfigError) as e:
            Remote(uri).check_access()
        assert "the credentials are refused" in _one_line(e)
    finally:
        server.shutdown()


def test_missing_run_is_one_line(s3: str) -> None:
    from autocompress.search import SearchResult

    with pytest.raises(AutocompressError) as e:
        SearchResult.load(f"{s3}/never-written")
    assert "does not exist" in _one_line(e)


# --- records and artifacts on the bucket -------------------------------------------------------
def test_records_and_adoption_on_s3(s3: str, tmp_path: Path) -> None:
    uri = f"{s3}/records-test"
    rec = {**stub_record("a1", '{"p": 1}'), "status": "COMPLETE", "values": {"accuracy": 0.9}}
    write_record(uri, rec)
    assert read_record(uri, "a1") == json.loads(json.dumps(rec))
    assert read_record(uri, "missing") is None
    remote = Remote(uri)
    remote.write_bytes("records/junk.json", b"{not json")
    assert read_record(uri, "junk") is None
    # an orphan put up for adoption is taken over exactly once, by the same plan
    remote.write_bytes(f"records/adopt/{plan_key(rec['plan_json'])}.json", json.dumps(rec).encode())
    assert adopt(uri, "b2", '{"p": 2}') is None  # another plan
    got = adopt(uri, "b1", rec["plan_json"])
    assert got is not None and got["trial_id"] == "b1" and got["adopted_from"] == "a1"
    assert read_record(uri, "b1")["values"] == {"accuracy": 0.9}
    assert adopt(uri, "c1", rec["plan_json"]) is None
    assert remote.listing("records/adopt") == []
    # the driver's mirror follows the bucket
    mirror = tmp_path / "mirror"
    remote.pull_record(mirror, "b1")
    assert set(read_records(mirror)) == {"b1"}


def test_mirror_start_resume_and_artifact_fetch(s3: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    remote = Remote(f"{s3}/mirror-test")
    remote.check_access()
    with pytest.raises(ConfigError) as e:
        remote.check_use(resume=True)
    assert "holds no run" in _one_line(e)
    assert remote.start_mirror(resume=False) == remote.mirror()
    remote.write_bytes("run.json", b'{"_type": "autocompress-run"}')
    write_record(remote.uri, {**stub_record("t1", "{}"), "status": "FAILED"})
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    (art / "weights.safetensors").write_bytes(b"\0" * 10)
    remote.upload(art, "trials/t1")
    with pytest.raises(ConfigError) as e:
        remote.check_use(resume=False)
    assert "already holds files" in _one_line(e)
    (remote.mirror() / "stale.txt").write_text("from an older session")
    mirror = remote.start_mirror(resume=True)
    assert sorted(p.name for p in mirror.iterdir()) == ["records", "run.json"]
    assert set(read_records(mirror)) == {"t1"}
    remote.fetch_artifact(mirror, "t1")
    assert (mirror / "trials" / "t1" / "weights.safetensors").read_bytes() == b"\0" * 10
    local, again = open_run(remote.uri)
    assert again == remote and (local / "run.json").is_file()
