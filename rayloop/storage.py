"""One way to reach storage: a local path or any ``pyarrow.fs`` URI.

``Storage("s3://bucket/prefix")`` and ``Storage("/data/rayloop")`` behave the
same; everything above this module works with relative keys such as
``models/demo/3/model.safetensors``.

    >>> import tempfile
    >>> st = Storage(tempfile.mkdtemp())
    >>> st.write_bytes("a/b.txt", b"hi")
    >>> st.read_bytes("a/b.txt")
    b'hi'
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rayloop.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def _s3_filesystem(uri: str, endpoint: str | None) -> tuple[pafs.FileSystem, str]:
    import pyarrow.fs as pafs

    rest = uri.split("://", 1)[1]
    kwargs: dict[str, object] = {}
    endpoint = endpoint or os.environ.get("RAYLOOP_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = os.environ["AWS_DEFAULT_REGION"]
    return pafs.S3FileSystem(**kwargs), rest.rstrip("/")


def resolve_filesystem(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, base_path)`` for a local path or URI."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        return _s3_filesystem(uri, s3_endpoint)
    if "://" not in uri:
        path = Path(uri).expanduser().absolute()
        return pafs.LocalFileSystem(), str(path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a terse message
        raise ConfigError(f"cannot open storage {uri!r}: {e}") from None
    return fs, path.rstrip("/")


class Storage:
    """Keys under a root on a pyarrow filesystem."""

    def __init__(self, root: str, *, s3_endpoint: str | None = None) -> None:
        self.uri = root
        self.s3_endpoint = s3_endpoint
        self.fs, self.base = resolve_filesystem(root, s3_endpoint)
        self.is_local = type(self.fs).__name__ == "LocalFileSystem"

    def path(self, key: str) -> str:
        """Filesystem path (no scheme) of a key."""
        key = key.strip("/")
        return posixpath.join(self.base, key) if key else self.base

    def uri_of(self, key: str) -> str:
        """Full URI of a key, usable by Ray Data and other pyarrow readers."""
        if self.is_local:
            return self.path(key)
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path(key)}"

    def exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound)

    def makedirs(self, key: str) -> None:
        self.fs.create_dir(self.path(key), recursive=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        parent = posixpath.dirname(key.strip("/"))
        if parent:
            self.makedirs(parent)
        with self.fs.open_output_stream(self.path(key)) as f:
            f.write(data)

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(self.path(key)) as f:
            return bytes(f.read())

    def size(self, key: str) -> int:
        return int(self.fs.get_file_info(self.path(key)).size or 0)

    def list(self, key: str, recursive: bool = True) -> Iterator[str]:
        """Keys of files under ``key``, relative to the storage root."""
        import pyarrow.fs as pafs

        base = self.path(key)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return
        sel = pafs.FileSelector(base, recursive=recursive)
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                yield posixpath.relpath(info.path, self.base)

    def delete(self, key: str) -> None:
        import pyarrow.fs as pafs

        p = self.path(key)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    def upload_file(self, local: str | Path, key: str, chunk: int = 8 << 20) -> None:
        parent = posixpath.dirname(key.strip("/"))
        if parent:
            self.makedirs(parent)
        with open(local, "rb") as src, self.fs.open_output_stream(self.path(key)) as dst:
            while True:
                buf = src.read(chunk)
                if not buf:
                    break
                dst.write(buf)

    def download_file(self, key: str, local: str | Path, chunk: int = 8 << 20) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self.path(key)) as src, open(local, "wb") as dst:
            while True:
                buf = src.read(chunk)
                if not buf:
                    break
                dst.write(buf)
