"""Local paths and cloud URIs (``s3://``, ``gs://``, ``file://``) behind one small API.

Every stage of a job reads and writes through pyarrow filesystems, so the same config runs on a
laptop (``runs/x``) and on a cloud cluster (``s3://bucket/runs/x``). Library stages that only
understand local folders run inside :func:`staged_output` (write locally, upload on success) and
read remote inputs through :func:`localize` (download once into a cache folder).

Credentials come from the usual places (AWS env/instance profile, GCP application-default
credentials); nothing here handles secrets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for object-store URIs (s3/gs/...); False for local paths and ``file://``."""
    return str(uri).startswith(REMOTE_SCHEMES)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``join("s3://b/run", "triage", "x")`` → ``"s3://b/run/triage/x"`` (local paths too)."""
    base = str(uri).rstrip("/")
    for p in parts:
        base = f"{base}/{str(p).strip('/')}"
    return base


def resolve(uri: str | os.PathLike):
    """``uri`` → ``(pyarrow FileSystem, path inside it)``. Local paths are made absolute."""
    import pyarrow.fs as pafs

    s = str(uri)
    if "://" not in s:
        return pafs.LocalFileSystem(), os.path.abspath(s)
    try:
        return pafs.FileSystem.from_uri(s)
    except Exception as e:  # ArrowInvalid for an unknown scheme, OSError for a missing bucket
        raise ValueError(f"cannot open {s!r}: {e} (use a local path, file://, s3:// or gs://)") from None


def exists(uri: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str | os.PathLike) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    """Write a small text file; local writes go through a temp file + rename (no torn markers)."""
    fs, path = resolve(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:  # object stores: a PUT is atomic
        f.write(text.encode("utf-8"))


def read_json(uri: str | os.PathLike):
    return json.loads(read_text(uri))


def write_json(uri: str | os.PathLike, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete_dir(uri: str | os.PathLike) -> None:
    """Remove a folder and everything under it; nothing happens when it does not exist."""
    if not exists(uri):
        return
    fs, path = resolve(uri)
    fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local folder's contents to ``uri`` (a local folder too, then it is a plain copy)."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if os.path.abspath(str(local_dir)) == path and not is_remote(uri):
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def cache_dir() -> Path:
    """Where remote inputs are downloaded (``TRACE_CACHE`` or ``~/.cache/trace-ray``)."""
    return Path(os.environ.get("TRACE_CACHE", Path.home() / ".cache" / "trace-ray"))


def localize(uri: str | os.PathLike) -> str:
    """A local path holding ``uri``'s content: itself when local, else a cached download.

    Files and folders both work; the cache key is the URI, so a second call does not download.
    """
    s = str(uri)
    if not is_remote(s):
        fs, path = resolve(s)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{s} does not exist")
        return path
    import pyarrow.fs as pafs

    fs, path = resolve(s)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{s} does not exist")
    dest = cache_dir() / hashlib.sha256(s.encode()).hexdigest()[:16] / Path(path).name
    if dest.exists():
        return str(dest)
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        if info.type == pafs.FileType.Directory:
            download_dir(s, tmp / dest.name)
        else:
            pafs.copy_files(path, str(tmp / dest.name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / dest.name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


@contextlib.contextmanager
def staged_output(uri: str | os.PathLike) -> Iterator[str]:
    """Yield a local folder to write into; when ``uri`` is remote, upload it on success.

    Local ``uri``: the folder itself (created). Remote: a folder under :func:`cache_dir` named
    after the URI, uploaded and then removed when the block ends without an exception. After a
    failure it stays, so a resubmission on the same node resumes from what it holds (e.g. Ray
    Train checkpoints); nothing half-written reaches the object store.
    """
    if not is_remote(uri):
        _, path = resolve(uri)
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
        return
    local = cache_dir() / "staging" / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    yield str(local)
    upload_dir(local, uri)
    shutil.rmtree(local, ignore_errors=True)


__all__ = [
    "is_remote", "join", "resolve", "exists", "read_text", "write_text", "read_json", "write_json",
    "delete_dir", "upload_dir", "download_dir", "localize", "staged_output", "cache_dir",
]
