"""Names, aliases and references (``REF``): validation and parsing.

A model name or alias becomes a path component in storage (``models/<name>/``),
so both are checked before anything touches storage or the database.

A REF is ``name@3`` (version 3), ``name@v3`` (same), ``name@production`` (an
alias), ``name@latest`` (highest live version) or ``name`` alone, which means
``name@production``.

    >>> parse_ref("demo@3")
    Ref(name='demo', version=3, alias=None)
    >>> parse_ref("demo")
    Ref(name='demo', version=None, alias='production')
"""

from __future__ import annotations

import re
from typing import NamedTuple

from rayloop.errors import InvalidNameError

DEFAULT_ALIAS = "production"
LATEST = "latest"
"""Pseudo-alias: the highest live version. It cannot be set."""

MAX_NAME_LEN = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^[vV]?([0-9]+)$")


def _check(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidNameError(f"{kind} must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise InvalidNameError(f"{kind} is empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidNameError(f"{kind} {value!r} is {len(value)} characters long; the limit is {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidNameError(
            f"{kind} {value!r} is not allowed (path separators, '..', spaces and odd characters are refused)"
        )
    return value


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`InvalidNameError`."""
    return _check("model name", name)


def validate_alias(alias: object) -> str:
    """Return ``alias`` if it can be set; version-like names and ``latest`` are reserved."""
    _check("alias", alias)
    assert isinstance(alias, str)
    if _VERSION_RE.fullmatch(alias):
        raise InvalidNameError(
            f"alias {alias!r} looks like a version number, so `name@{alias}` would be ambiguous",
            hint="Use a word such as production, candidate, canary or shadow.",
        )
    if alias == LATEST:
        raise InvalidNameError(
            f"alias {alias!r} is reserved: `name@latest` always means the highest live version",
            hint="Pick another alias name.",
        )
    return alias


def validate_key(key: object) -> str:
    """Annotation and metadata keys follow the name rules."""
    return _check("key", key)


def validate_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidNameError(
            f"version {version!r} is not a positive integer", hint="Versions are numbered 1, 2, 3, ..."
        )
    return version


class Ref(NamedTuple):
    """A parsed reference: exactly one of ``version`` and ``alias`` is set."""

    name: str
    version: int | None
    alias: str | None

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.alias}"


def parse_ref(ref: str | Ref) -> Ref:
    """Parse ``name``, ``name@3``, ``name@v3``, ``name@alias`` or ``name@latest``."""
    if isinstance(ref, Ref):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidNameError(
            f"model reference {ref!r} is empty", hint="Write name@3 (a version), name@production (an alias) or name."
        )
    name, sep, tail = ref.strip().partition("@")
    validate_name(name)
    if not sep:
        return Ref(name, None, DEFAULT_ALIAS)
    if not tail:
        raise InvalidNameError(
            f"model reference {ref!r} ends with '@'", hint="Write name@3 (a version) or name@production (an alias)."
        )
    m = _VERSION_RE.fullmatch(tail)
    if m:
        return Ref(name, validate_version(int(m.group(1))), None)
    if tail == LATEST:
        return Ref(name, None, LATEST)
    return Ref(name, None, validate_alias(tail))
