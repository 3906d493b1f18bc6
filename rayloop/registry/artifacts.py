"""Artifacts of a version: checking a model directory, hashing while copying, verifying.

Every byte is hashed exactly once per copy, in the same pass that copies it:
the sha256 of one chunk runs while a helper thread writes the previous one
(both release the GIL), and several files move at once. Downloads are
verified against the manifest in the database before they become visible.

What a model directory may contain (no links, no pickle, complete
safetensors) and the fingerprint definition live in :mod:`rayloop.modelfiles`,
shared with the serving replica's checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rayloop import modelfiles
from rayloop.errors import IntegrityError, NotFoundError, UnsafeArtifactError
from rayloop.registry.models import FileEntry
from rayloop.storage import Storage

CHUNK = modelfiles.CHUNK
MANIFEST_FILE = modelfiles.MANIFEST_FILE
"""Written next to the files in storage: the version is self-describing."""
MARKER_FILE = ".rayloop-verified.json"
"""Written into a fetched directory once every hash matched."""

# Formats that unpickle on load (arbitrary code execution): refused.
UNSAFE_SUFFIXES = modelfiles.UNSAFE_SUFFIXES


Progress = Callable[[int], None]
"""Called with the byte count of each chunk copied or hashed (from I/O threads: it must be thread-safe)."""


def version_prefix(name: str, version: int) -> str:
    return f"models/{name}/{version}"


def fingerprint(manifest: dict[str, FileEntry]) -> str:
    """sha256 of the manifest's canonical JSON: identical files give an identical fingerprint."""
    return modelfiles.fingerprint(manifest)


# -- checking a model directory ----------------------------------------------
def _check_safetensors(path: Path, rel: str) -> None:
    """A .safetensors file must be one, and complete: header parsed, size equal to what it promises."""
    modelfiles.read_safetensors_header(path, name=rel, error=UnsafeArtifactError)


def scan_model_dir(model_dir: str | Path) -> list[tuple[str, Path]]:
    """List ``(relative posix path, absolute path)`` of the files to register, after checking them.

    Hidden files and directories (``.git``, ``.cache``) are skipped. Refuses
    symbolic links and special files (:func:`rayloop.modelfiles.list_files`),
    pickle weights, and requires ``config.json`` and at least one complete
    ``*.safetensors``.
    """
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise NotFoundError(
            f"model directory {str(root)!r} does not exist or is not a directory", hint="Pass an HF model directory."
        )
    files = modelfiles.list_files(root)
    for rel, p in files:
        if p.suffix.lower() in UNSAFE_SUFFIXES:
            raise UnsafeArtifactError(
                f"{rel} in {str(root)!r} is a pickle-based weights file ({p.suffix}); "
                "only safetensors weights are accepted"
            )
    rels = {r for r, _ in files}
    if MANIFEST_FILE in rels:
        raise UnsafeArtifactError(
            f"{str(root)!r} contains a top-level {MANIFEST_FILE}, which the registry writes itself",
            hint=f"Rename or remove {MANIFEST_FILE} from the model directory.",
        )
    if "config.json" not in rels:
        raise UnsafeArtifactError(
            f"{str(root)!r} has no config.json; it is not a Hugging Face model directory",
            hint="Save the model with `model.save_pretrained(dir)`.",
        )
    weights = [(r, p) for r, p in files if r.endswith(".safetensors")]
    if not weights:
        raise UnsafeArtifactError(f"{str(root)!r} holds no *.safetensors weights")
    for rel, p in weights:
        _check_safetensors(p, rel)
    return files


# -- hashing while copying ---------------------------------------------------
def _pipe(
    src: Any,
    write: Callable[[Any], Any],
    writer: ThreadPoolExecutor,
    *,
    reuse_buffers: bool,
    progress: Progress | None = None,
) -> FileEntry:
    """Copy ``src`` -> ``write`` chunk by chunk; hash chunk k while chunk k is being written.

    ``reuse_buffers`` reads into two alternating preallocated buffers (no
    allocation or page faults per chunk). Only for writers that are done with
    the data when ``write`` returns: a pyarrow S3 stream may keep a reference
    to the buffer for a background upload, so those get a fresh chunk each time.
    """
    h = hashlib.sha256()
    size = 0
    pending: Future[Any] | None = None
    ring = (bytearray(CHUNK), bytearray(CHUNK)) if reuse_buffers else None
    k = 0
    while True:
        if ring is not None:
            buf = ring[k & 1]  # its previous write finished before chunk k-1 was submitted
            n = src.readinto(buf)
            view: Any = memoryview(buf)[:n]
        else:
            view = src.read(CHUNK)
            n = len(view)
        if not n:
            break
        if pending is not None:
            pending.result()
        pending = writer.submit(write, view)
        h.update(view)
        size += n
        k += 1
        if progress is not None:
            progress(n)
    if pending is not None:
        pending.result()
    return {"sha256": h.hexdigest(), "size": size}


def _parallel(jobs: Iterable[Any], fn: Callable[[Any, ThreadPoolExecutor], Any], workers: int) -> list[Any]:
    jobs = list(jobs)
    n = max(1, min(workers, len(jobs)))
    with (
        ThreadPoolExecutor(n, thread_name_prefix="rl-io") as pool,
        ThreadPoolExecutor(n, thread_name_prefix="rl-w") as wr,
    ):
        return list(pool.map(lambda j: fn(j, wr), jobs))


def hash_files(files: list[tuple[str, Path]], *, workers: int = 4) -> dict[str, FileEntry]:
    """Manifest of local files without copying them."""

    def one(job: tuple[str, Path], _wr: ThreadPoolExecutor) -> tuple[str, FileEntry]:
        return job[0], modelfiles.hash_file(job[1], job[0])

    return dict(_parallel(files, one, workers))


def upload_files(
    storage: Storage,
    files: list[tuple[str, Path]],
    prefix: str,
    *,
    workers: int = 4,
    progress: Progress | None = None,
) -> dict[str, FileEntry]:
    """Copy local files under ``prefix`` and return their manifest (hashed in the same pass); ``progress`` is
    called with each chunk's byte count as it is copied."""
    for d in sorted({posixpath.dirname(f"{prefix}/{rel}") for rel, _ in files}):
        storage.makedirs(d)

    def one(job: tuple[str, Path], wr: ThreadPoolExecutor) -> tuple[str, FileEntry]:
        rel, src = job
        # O_NOFOLLOW: a file swapped for a link after scan_model_dir is refused, not followed.
        with (
            modelfiles.open_regular(src, rel) as fin,
            storage.fs.open_output_stream(storage.path(f"{prefix}/{rel}")) as out,
        ):
            return rel, _pipe(fin, out.write, wr, reuse_buffers=storage.is_local, progress=progress)

    return dict(_parallel(files, one, workers))


def _mismatch(ref: str, rel: str, want: FileEntry, got: FileEntry, where: str) -> IntegrityError:
    if got["size"] != want["size"]:
        what = "truncated" if got["size"] < want["size"] else "longer than recorded"
        msg = f"{ref}: {where} file {rel!r} is {what}: {got['size']} bytes, manifest says {want['size']}"
    else:
        msg = (
            f"{ref}: {where} file {rel!r} was modified: "
            f"sha256 {got['sha256'][:16]}..., manifest says {want['sha256'][:16]}..."
        )
    return IntegrityError(msg, path=rel)


def download_verified(
    storage: Storage,
    prefix: str,
    manifest: dict[str, FileEntry],
    target: Path,
    *,
    ref: str,
    workers: int = 4,
    progress: Progress | None = None,
) -> None:
    """Materialise a version into ``target`` atomically; every file is checked against ``manifest``.

    Files land in a sibling temporary directory which is renamed into place
    only when all hashes match, so a reader never sees a partial directory.
    If another process won the race to ``target``, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:

        def one(rel: str, wr: ThreadPoolExecutor) -> None:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                src = storage.fs.open_input_stream(storage.path(f"{prefix}/{rel}"))
            except FileNotFoundError:
                raise IntegrityError(
                    f"{ref}: stored file {rel!r} is missing from {storage.uri_of(prefix)}", path=rel
                ) from None
            with src, open(dst, "wb", buffering=0) as out:
                got = _pipe(src, out.write, wr, reuse_buffers=True, progress=progress)
            if got != manifest[rel]:
                raise _mismatch(ref, rel, manifest[rel], got, "stored")

        _parallel(sorted(manifest), one, workers)
        write_marker(tmp, manifest)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_stored(
    storage: Storage,
    prefix: str,
    manifest: dict[str, FileEntry],
    *,
    ref: str,
    workers: int = 4,
    progress: Progress | None = None,
) -> None:
    """Re-hash every stored file; refuse missing, truncated, modified or unexpected files."""
    present = {posixpath.relpath(k, prefix) for k in storage.list(prefix)}
    extra = sorted(present - set(manifest) - {MANIFEST_FILE})
    if extra:
        raise IntegrityError(f"{ref}: unexpected file {extra[0]!r} in {storage.uri_of(prefix)}", path=extra[0])
    for rel in sorted(manifest):
        if rel not in present:
            raise IntegrityError(f"{ref}: stored file {rel!r} is missing from {storage.uri_of(prefix)}", path=rel)

    def one(rel: str, _wr: ThreadPoolExecutor) -> None:
        with storage.fs.open_input_stream(storage.path(f"{prefix}/{rel}")) as src:
            got = modelfiles.hash_stream(src, progress)
        if got != manifest[rel]:
            raise _mismatch(ref, rel, manifest[rel], got, "stored")

    _parallel(sorted(manifest), one, workers)


# -- the verified-marker of a local copy ---------------------------------------
def write_marker(directory: Path, manifest: dict[str, FileEntry]) -> None:
    """Record size and mtime of each verified file, so a later check is a stat, not a re-hash."""
    stats = {}
    for rel in manifest:
        st = (directory / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    (directory / MARKER_FILE).write_text(json.dumps({"fingerprint": fingerprint(manifest), "files": stats}))


def local_copy_ok(directory: Path, manifest: dict[str, FileEntry], *, rehash: bool = False) -> bool:
    """True if ``directory`` holds exactly the manifest's files, unchanged since they were verified.

    Without ``rehash`` a cache hit costs one ``lstat`` per file: every file
    must be a regular file (a link is a miss, as is a linked directory), its
    size must equal the manifest's (so a copy cut short or grown never
    reaches an engine, whatever the marker says) and its size and mtime must
    equal what the marker recorded right after the hashes matched.

    Size + mtime may stand in for re-hashing only while the cache is private
    to this node (written by rayloop alone, on a local disk): anyone else who
    can write to it can edit a file in place and put its mtime back with
    ``os.utime``. For a shared or network cache directory pass ``rehash=True``.
    """
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("fingerprint") != fingerprint(manifest) or not isinstance(marker.get("files"), dict):
        return False
    present: set[str] = set()
    for dp, dirnames, fs in os.walk(directory):
        if any(os.path.islink(os.path.join(dp, d)) for d in dirnames):
            return False
        present.update(Path(dp, f).relative_to(directory).as_posix() for f in fs)
    present.discard(MARKER_FILE)
    if present != set(manifest):
        return False
    for rel, want in manifest.items():
        try:
            st = os.lstat(directory / rel)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != want["size"]:
            return False
        if [st.st_size, st.st_mtime_ns] != marker["files"].get(rel):
            return False
        if rehash:
            try:
                with modelfiles.open_regular(directory / rel, rel) as f:
                    if modelfiles.hash_stream(f) != want:
                        return False
            except (OSError, UnsafeArtifactError):
                return False
    return True
