"""The files of a Hugging Face model directory: listing, safetensors checks, hashes, fingerprint.

One definition, shared by the registry (what gets registered) and the serving
replica (what an engine may load), so the two cannot drift apart:

- :func:`list_files` walks a directory and refuses every symbolic link (file
  or directory: it could point outside the directory, e.g. a
  ``tokenizer.json`` linked to a secret) and everything that is not a regular
  file (a FIFO would hang the hashing). Hidden entries (``.git``, ``.cache``)
  are skipped without being followed.
- :func:`read_safetensors_header` checks that a ``*.safetensors`` file is
  complete: its size must be exactly 8 + header length + the end of its last
  tensor, so a copy cut short (or padded) is refused with both byte counts;
  then ``safetensors.safe_open`` validates dtypes, shapes and offsets the
  way the engine's loader will.
- :func:`hash_file`, :func:`manifest` and :func:`fingerprint` define the
  content fingerprint of a version: sha256 of the canonical JSON of
  ``{path: [sha256, size]}``. Registry fingerprints in databases depend on
  these bytes; do not change the definition.

Only the standard library, ``safetensors`` and :mod:`rayloop.errors` are
imported here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypedDict

import safetensors

from rayloop.errors import IntegrityError, UnsafeArtifactError

CHUNK = 8 << 20
MANIFEST_FILE = "manifest.json"
"""Written by the registry next to a version's files; never part of a manifest."""
# Formats that unpickle on load (arbitrary code execution): refused.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_SAFETENSORS_HEADER = 100 << 20

_COPY_HINT = (
    "Copy the real file into the model directory in place of the link "
    "(or copy the whole directory with `cp -rL SRC DST`), then try again."
)


class FileDigest(TypedDict):
    """One file of a manifest (same shape as ``rayloop.registry.models.FileEntry``)."""

    sha256: str
    size: int


# -- listing -------------------------------------------------------------------
def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _symlink_error(path: Path, shown: str, where: str) -> UnsafeArtifactError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return UnsafeArtifactError(
        f"{shown}{where} is a symbolic link (to {target!r}); links are refused because they can point "
        "outside the model directory",
        hint=_COPY_HINT,
    )


def _raise(err: OSError) -> None:
    raise err


def list_files(model_dir: str | Path) -> list[tuple[str, Path]]:
    """``(relative posix path, absolute path)`` of every non-hidden file under ``model_dir``.

    In walk order: a directory's files by name, then its subdirectories by name.

    Raises :class:`UnsafeArtifactError` naming the entry for any symbolic link
    (to a file or a directory, dangling or not) and for anything that is not a
    regular file or directory. Hidden files and directories are skipped and
    not entered. ``model_dir`` itself may be a link; callers check that it is
    a directory. The absolute paths are under the resolved ``model_dir``.
    """
    given = Path(model_dir).expanduser()
    root = given.resolve()
    out: list[tuple[str, Path]] = []
    where = f" in {str(given)!r}"
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            p = here / name
            if p.is_symlink():
                raise _symlink_error(p, p.relative_to(root).as_posix() + "/", where)
            keep.append(name)
        dirnames[:] = keep  # os.walk does not enter links (followlinks=False); links are refused above anyway
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise _symlink_error(p, rel, where)
            if not stat.S_ISREG(mode):
                raise UnsafeArtifactError(
                    f"{rel}{where} is {_kind(mode)}; only regular files can be registered or served",
                    hint="Remove it from the model directory.",
                )
            out.append((rel, p))
    return out


def open_regular(path: str | Path, name: str | None = None) -> BinaryIO:
    """Open a regular file for unbuffered reading, refusing a symbolic link or a special file.

    ``O_NOFOLLOW`` closes the gap between :func:`list_files` and the read: a
    file swapped for a link meanwhile is refused, not followed.
    """
    shown = name if name is not None else str(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink_error(Path(path), shown, "") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeArtifactError(f"{shown} is {_kind(mode)}; only regular files can be registered or served")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


# -- safetensors ---------------------------------------------------------------
@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a complete, valid safetensors file."""

    tensors: dict[str, dict[str, Any]]
    """``name -> {"dtype", "shape", "data_offsets"}``, as in the file (``__metadata__`` removed)."""
    metadata: dict[str, str] | None
    header_bytes: int
    """N, the length of the JSON header (the file starts with N as 8 little-endian bytes)."""
    file_bytes: int


ErrorType = type[IntegrityError] | type[UnsafeArtifactError]


def _error(error: ErrorType, message: str, path: Path, hint: str | None = None) -> IntegrityError | UnsafeArtifactError:
    if issubclass(error, IntegrityError):
        return error(message, path=str(path), hint=hint)
    return error(message, hint=hint)


def read_safetensors_header(
    path: str | Path, *, name: str | None = None, error: ErrorType = IntegrityError
) -> SafetensorsHeader:
    """Check that ``path`` is a complete safetensors file and return its header.

    The file must be exactly ``8 + N + end`` bytes long, where N is the header
    length in its first 8 bytes and ``end`` the largest ``data_offsets`` end of
    its tensors: a copy cut short or padded raises ``error`` (the registry
    passes :class:`UnsafeArtifactError`, serving the default
    :class:`IntegrityError`) saying how many bytes the file holds and how
    many its header promises. Then ``safetensors.safe_open`` validates the
    rest (dtypes, shapes against offsets, no holes or overlaps). ``name``
    (default: the file name) is how messages call the file.
    """
    p = Path(path)
    shown = name if name is not None else p.name
    with open_regular(p, shown) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 1 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise _error(
                error, f"{shown} is not a valid safetensors file (bad header length)", p, "Re-save it with safetensors."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise _error(error, f"{shown} is not a valid safetensors file (header is not JSON)", p) from None
    if not isinstance(header, dict):
        raise _error(error, f"{shown} is not a valid safetensors file (header is not a mapping)", p)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _error(error, f"{shown} is not a valid safetensors file (a tensor has no data_offsets)", p) from None
    promised = 8 + n + end
    if size != promised:
        what = "is truncated" if size < promised else f"has {size - promised} bytes after its last tensor"
        raise _error(
            error,
            f"{shown} {what}: it holds {size} bytes, its header promises {promised}",
            p,
            "Copy the checkpoint again from a good source; a partial checkpoint would load as a mixed model."
            if size < promised
            else "Re-save it with safetensors; the engine's loader refuses a file with trailing bytes.",
        )
    try:
        with safetensors.safe_open(str(p), framework="numpy") as st:
            names = list(st.keys())
            metadata = st.metadata()
    except Exception as e:  # SafetensorError, or OSError from the mmap
        raise _error(
            error, f"{shown} is not a valid safetensors file ({e})", p, "Re-save it with safetensors."
        ) from None
    if sorted(names) != sorted(tensors):
        raise _error(error, f"{shown} changed while it was being checked", p, "Check it again once it is written.")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, header_bytes=n, file_bytes=size)


# -- hashes and the fingerprint ------------------------------------------------
def hash_stream(src: Any, progress: Callable[[int], None] | None = None) -> FileDigest:
    """sha256 and size of everything ``src`` (anything with ``readinto``) yields; ``progress`` gets each
    chunk's byte count."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.readinto(buf):
        h.update(view[:n])
        size += n
        if progress is not None:
            progress(n)
    return {"sha256": h.hexdigest(), "size": size}


def hash_file(path: str | Path, name: str | None = None) -> FileDigest:
    """sha256 and size of a regular file (a link or special file is refused)."""
    with open_regular(path, name) as f:
        return hash_stream(f)


def manifest(model_dir: str | Path) -> dict[str, FileDigest]:
    """``{relative path: {sha256, size}}`` of the files :func:`list_files` lists, less a top-level manifest.json."""
    return {rel: hash_file(p, rel) for rel, p in list_files(model_dir) if rel != MANIFEST_FILE}


def fingerprint(files: Mapping[str, FileDigest]) -> str:
    """sha256 of the manifest's canonical JSON: identical files give an identical fingerprint.

    Stored in registry databases: keep these bytes exactly as they are.
    """
    canon = json.dumps({k: [v["sha256"], int(v["size"])] for k, v in sorted(files.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def dir_fingerprint(model_dir: str | Path) -> str:
    """:func:`fingerprint` of :func:`manifest`: what the registry records for the same files."""
    return fingerprint(manifest(model_dir))
