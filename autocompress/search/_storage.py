"""Where a run lives: a local directory, or a URI on object storage (S3, GCS, Azure, HDFS, ...).

A local ``run_dir`` is used as it always was: every Ray node writes there (one machine, or a
shared filesystem). A URI (``s3://bucket/prefix``, ``gs://...``, ``abfs://...``, anything
:meth:`pyarrow.fs.FileSystem.from_uri` understands, else anything ``fsspec`` knows; the same
filesystems Ray Tune's ``storage_path`` takes) is for clusters without a shared filesystem:

* trials (on any node) read and write their records at ``<uri>/records/<id>.json`` and upload
  their artifact to ``<uri>/trials/<id>/`` (exported to a local scratch directory first);
* the driver works in a local *mirror* of the run (``$AUTOCOMPRESS_CACHE/runs/<key>/driver``),
  pulls the record of every trial that reports, pushes the teacher, ``run.json``, the study
  journal, the tables, the front's artifacts and the report to the URI;
* ``resume=True`` rebuilds the mirror from the URI alone (a fresh machine works); finished
  trials are adopted from their records, Ray Tune's own (pickled) state stays on the driver;
* :func:`open_run` downloads a finished run for ``SearchResult.load``, the report and export.

Credentials and endpoints are the filesystem's own: for S3 the ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL`` for an S3-compatible server) or URI options such as
``s3://bucket/run?endpoint_override=host:9000&scheme=http``; every node needs them.

Example:
    >>> locate("runs/demo").name
    'demo'
    >>> locate("s3://bucket/runs/demo?region=us-east-1").uri
    's3://bucket/runs/demo?region=us-east-1'
    >>> try:
    ...     locate("nosuch://bucket/run")
    ... except Exception as e:
    ...     print(e)  # doctest: +ELLIPSIS
    run_dir 'nosuch://bucket/run': the scheme 'nosuch' is not supported: use a local path, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocompress.errors import ConfigError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_MANGLED = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")
HINT = (
    "use a local path, s3://bucket/prefix, gs://bucket/prefix, abfs://container@account/prefix, "
    "hdfs://host/path or a filesystem fsspec knows"
)
BUCKETED = {"s3", "gs", "gcs", "abfs", "abfss", "az"}
"""Schemes whose first path component is a bucket (container) that must already exist."""
PULLED = ("records", "teacher", "sensitivity", "run.json")
"""What a resumed driver downloads: the trials' records, the teacher, the sensitivity pass (if
any) and the run's settings."""
_FS: dict[str, tuple[Any, str]] = {}
"""This process's open filesystems, by URI."""


def is_uri(run_dir: Any) -> bool:
    """True if ``run_dir`` is a URI of a remote filesystem (``file://`` is a local path).

    Example:
        >>> is_uri("s3://b/run"), is_uri("runs/x"), is_uri("file:///tmp/x")
        (True, False, False)
    """
    return isinstance(run_dir, str) and bool(_URI.match(run_dir)) and not _is_file_uri(run_dir)


def _is_file_uri(s: str) -> bool:
    return s.lower().startswith("file://")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def locate(run_dir: Any) -> Path | Remote:
    """A local ``Path`` (``~`` expanded, resolved) or a :class:`Remote` for a URI.

    A scheme that no filesystem knows is refused in one line, never turned into a local path
    (``s3:/bucket/run``, what ``Path("s3://bucket/run")`` makes of a URI, is refused too).
    Nothing is contacted here: :meth:`Remote.check_access` does that.
    """
    if isinstance(run_dir, Remote):
        return run_dir
    if not isinstance(run_dir, str | os.PathLike) or not str(run_dir):
        raise ConfigError(f"run_dir={run_dir!r} is invalid: give a directory path or a URI")
    text = str(run_dir)
    if _is_file_uri(text):
        return Path(text[len("file://") :]).expanduser().resolve()
    if m := _URI.match(text):
        remote = Remote(text)
        remote.filesystem()  # refuses an unknown scheme (no network for S3/GCS/Azure)
        return remote
    if m := _MANGLED.match(text):
        raise ConfigError(
            f"run_dir {text!r} looks like a URI that lost a slash: write {m.group(1)}://..."
        )
    return Path(text).expanduser().resolve()


@dataclass(frozen=True)
class Remote:
    """A run directory on a remote filesystem, named by its URI (plain data: it pickles)."""

    uri: str

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0].lower()

    def __str__(self) -> str:
        return self.uri

    # --- the filesystem ------------------------------------------------------------------------
    def filesystem(self) -> tuple[Any, str]:
        """``(pyarrow FileSystem, root path inside it)``, opened once per process."""
        hit = _FS.get(self.uri)
        if hit is None:
            hit = _FS[self.uri] = _open(self.uri, self.scheme)
        return hit

    def _path(self, rel: str = "") -> str:
        root = self.filesystem()[1].rstrip("/")
        return f"{root}/{rel}" if rel else root

    def check_access(self, *, write: bool = True) -> None:
        """Contact the filesystem; raise one line if the bucket is missing, the endpoint is
        unreachable or the credentials are refused (``write``: a test object is written)."""
        import pyarrow.fs as pafs

        fs, root = self.filesystem()
        try:
            if self.scheme in BUCKETED:
                bucket = root.split("/", 1)[0]
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise ConfigError(
                        f"run_dir {self.uri!r}: the bucket {bucket!r} does not exist (or these "
                        "credentials cannot see it): create it or fix the URI"
                    )
            if write:
                probe = self._path(f".write-test-{uuid.uuid4().hex}")
                with fs.open_output_stream(probe) as f:
                    f.write(b"ok")
                fs.delete_file(probe)
            else:
                fs.get_file_info(root)
        except ConfigError:
            raise
        except Exception as e:  # pyarrow raises OSError (or ArrowException) with AWS's text
            raise self._unreachable(e) from None

    def _unreachable(self, e: BaseException) -> ConfigError:
        why = _one_line(e)
        text = str(e).upper()
        if any(s in text for s in ("ACCESS_DENIED", "ACCESSDENIED", "FORBIDDEN", "403")):
            hint = "the credentials are refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            hint += "(or the node's role) on every node"
        elif any(s in text for s in ("NETWORK", "CONNECT", "RESOLVE", "TIMEOUT", "TIMED OUT")):
            hint = "the endpoint is unreachable: check AWS_ENDPOINT_URL / endpoint_override"
        else:
            hint = "check the URI, the credentials and the endpoint"
        return ConfigError(f"run_dir {self.uri!r} cannot be used ({why}): {hint}")

    # --- files ---------------------------------------------------------------------------------
    def read_bytes(self, rel: str, limit: int | None = None) -> bytes | None:
        """The bytes of ``rel``, or None if it does not exist (or is over ``limit`` bytes)."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        info = fs.get_file_info(self._path(rel))
        if info.type != pafs.FileType.File or (limit is not None and info.size > limit):
            return None
        try:
            with fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` (an object store publishes an object whole, at close)."""
        fs = self.filesystem()[0]
        with fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.filesystem()[0].get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        """Delete a file or a directory tree; a missing one is fine."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        info = fs.get_file_info(self._path(rel))
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(self._path(rel))
        elif info.type == pafs.FileType.File:
            fs.delete_file(self._path(rel))

    def move(self, src: str, dst: str) -> bool:
        """Rename ``src`` to ``dst``; False if ``src`` is gone. Not atomic on object stores
        (copy then delete): adoption relies on the searcher never running one plan twice."""
        try:
            self.filesystem()[0].move(self._path(src), self._path(dst))
            return True
        except (FileNotFoundError, OSError):
            return False

    def listing(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Paths (relative to the run) of the files under ``rel``."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        sel = pafs.FileSelector(self._path(rel), recursive=recursive, allow_not_found=True)
        base = self._path() + "/"
        return sorted(
            i.path.removeprefix(base) for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
        )

    def entries(self) -> list[str]:
        """Names directly under the run (files and directories)."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        sel = pafs.FileSelector(self._path(), recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in fs.get_file_info(sel))

    def upload(self, local: Path, rel: str) -> None:
        """Copy a local file or directory tree to ``rel``."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        if local.is_dir():
            fs.create_dir(self._path(rel), recursive=True)
        pafs.copy_files(
            str(local),
            self._path(rel),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )

    def download(self, rel: str, local: Path) -> bool:
        """Copy ``rel`` (a file or a directory tree) to ``local``; False if it does not exist."""
        import pyarrow.fs as pafs

        fs = self.filesystem()[0]
        info = fs.get_file_info(self._path(rel))
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self._path(rel),
            str(local),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return True

    def download_dir(self, rel: str, local: Path) -> bool:
        """:meth:`download` of a directory, True only if it holds a ``manifest.json``."""
        if not self.exists(f"{rel}/manifest.json"):
            return False
        tmp = local.with_name(f".{local.name}.download")
        shutil.rmtree(tmp, ignore_errors=True)
        self.download(rel, tmp)
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
        return True

    # --- the driver's view -----------------------------------------------------------------
    def mirror(self, role: str = "driver") -> Path:
        """The local directory that mirrors this run (``$AUTOCOMPRESS_CACHE/runs/<key>/``)."""
        from autocompress.tasks._base import cache_dir

        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return cache_dir() / "runs" / key / role

    def check_use(self, resume: bool, clean: bool = True) -> bool:
        """Refuse a used run without ``resume`` and ``resume`` without a run; True if the
        run has started (holds ``run.json``). Leftovers of a start-up that was killed are
        deleted when resuming (with ``clean``)."""
        names = [n for n in self.entries() if not n.startswith(".write-test-")]
        started = "run.json" in names
        if not resume and names:
            raise ConfigError(
                f"run_dir {self.uri!r} already holds files: pass resume=True to continue that run "
                "or choose another run_dir"
            )
        if resume and not started:
            if not names:
                raise ConfigError(
                    f"resume=True but {self.uri!r} holds no run (no run.json): run without resume"
                )
            if set(names) - {"teacher"}:
                raise ConfigError(
                    f"resume=True but {self.uri!r} holds no run (no run.json) and other files: "
                    "choose the run_dir of the run to resume"
                )
            if clean:
                self.delete("teacher")
        return started

    def start_mirror(self, resume: bool) -> Path:
        """The driver's mirror, emptied (its lock kept) and, when resuming, refilled from the
        URI with what a resumed driver needs (:data:`PULLED`); call holding its lock."""
        from autocompress.search._checks import clear_run_dir

        started = self.check_use(resume)
        local = self.mirror()
        local.mkdir(parents=True, exist_ok=True)
        clear_run_dir(local)
        if started:
            self.pull(local, PULLED)
        return local

    def fetch_artifact(self, local: Path, trial_id: str, recorded: str = "") -> None:
        """Download trial ``trial_id``'s artifact into ``local`` from the first place it is
        (``pareto/<id>``, its recorded directory, ``trials/<id>``), unless already there."""
        for rel in (f"pareto/{trial_id}", recorded, f"trials/{trial_id}"):
            if rel and (local / rel / "manifest.json").is_file():
                return
            if rel and self.download_dir(rel, local / rel):
                return

    def publish(self, local: Path, interrupted: bool, keep: str) -> None:
        """Upload a finalized run from the driver's mirror: tables, journal, the front's
        artifacts; then delete what ``keep`` drops; ``result.json`` last (a run is finished
        when it is there)."""
        from autocompress.search._common import STUDY_FILE

        self.push(local, ["trials.csv", "pareto.csv", STUDY_FILE])
        if not interrupted:
            kept = local / "pareto"
            front = {p.name for p in kept.iterdir()} if kept.is_dir() else set()
            for name in {p.split("/")[1] for p in self.listing("pareto", recursive=True)}:
                if name not in front:
                    self.delete(f"pareto/{name}")
            self.push(local, ["pareto"])
            if keep in ("pareto", "none"):
                self.delete("trials")
        self.push(local, ["result.json"])

    def read_json(self, rel: str) -> dict[str, Any] | None:
        data = self.read_bytes(rel, limit=64 << 20)
        return None if data is None else json.loads(data)

    def pull(self, local: Path, names: Iterable[str]) -> None:
        """Download ``names`` (files or directories of the run) into ``local``."""
        for name in names:
            self.download(name, local / name)

    def push(self, local: Path, names: Iterable[str]) -> None:
        """Upload ``names`` (files or directories of ``local``) that exist."""
        for name in names:
            if (local / name).exists():
                self.upload(local / name, name)

    def pull_record(self, local: Path, trial_id: str) -> None:
        """Copy trial ``trial_id``'s record (if written) into the mirror, atomically."""
        data = self.read_bytes(f"records/{trial_id}.json")
        if data is None:
            return
        path = local / "records" / f"{trial_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.pull")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def sync_records(self, local: Path) -> None:
        """Make the run's ``records/`` (and ``records/adopt/``) what the mirror holds: used
        after a resume moved finished records up for adoption (no trial runs then)."""
        theirs = set(self.listing("records", recursive=True))
        base = local / "records"
        ours = {str(p.relative_to(local)) for p in base.rglob("*.json")} if base.is_dir() else set()
        for rel in sorted(ours - theirs):
            self.upload(local / rel, rel)
        for rel in sorted(theirs - ours):
            self.delete(rel)


def _open(uri: str, scheme: str) -> tuple[Any, str]:
    """Open the filesystem of ``uri`` with pyarrow, else fsspec; one line if neither can."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:
        if "nrecognized filesystem" not in str(e):
            raise ConfigError(f"run_dir {uri!r} is not a valid URI ({_one_line(e)})") from None
    except Exception as e:  # e.g. hdfs:// without a JVM, a bad URI option
        raise ConfigError(
            f"run_dir {uri!r}: its filesystem cannot be opened ({_one_line(e)})"
        ) from None
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
        fs = fsspec.filesystem(scheme)
    except ImportError:
        raise ConfigError(
            f"run_dir {uri!r}: the scheme {scheme!r} is not supported: {HINT}"
        ) from None
    except Exception as e:
        if isinstance(e, ValueError) and "protocol" in str(e).lower():
            raise ConfigError(
                f"run_dir {uri!r}: the scheme {scheme!r} is not supported: {HINT}"
            ) from None
        raise ConfigError(
            f"run_dir {uri!r}: its filesystem cannot be opened ({_one_line(e)})"
        ) from None
    root = fs._strip_protocol(uri.split("?", 1)[0])
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), str(root).rstrip("/")


def scratch_dir() -> Path:
    """A new local directory for one trial's artifact before it is uploaded."""
    return Path(tempfile.mkdtemp(prefix="autocompress-trial-"))


def open_run(run_dir: Any, *, role: str = "view") -> tuple[Path, Remote | None]:
    """A local directory holding the run ``run_dir`` for reading: the path itself, or a fresh
    download of a URI's run (without ``trials/``, fetched per artifact on demand)."""
    loc = locate(run_dir)
    if isinstance(loc, Path):
        return loc, None
    loc.check_access(write=False)
    local = loc.mirror(role)
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    skip = {"trials", "tune", "records"}
    names = [n for n in loc.entries() if n not in skip and not n.startswith(".")]
    if not names:
        from autocompress.errors import AutocompressError

        raise AutocompressError(f"run directory {loc.uri!r} does not exist: check the URI")
    loc.pull(local, names)
    return local, loc
