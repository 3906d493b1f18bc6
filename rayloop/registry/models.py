"""What the registry hands out: :class:`ModelVersion` and the lineage record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict


class FileEntry(TypedDict):
    """One file of a version's manifest."""

    sha256: str
    size: int


class Lineage(BaseModel):
    """Where a version came from; every key is optional.

    Evaluation reports and gate decisions arrive after registration and are
    attached with ``Registry.annotate`` instead (artifacts stay immutable).
    """

    model_config = ConfigDict(extra="forbid")

    snapshot_id: str | None = Field(default=None, description="Training data snapshot the version was trained on.")
    training_config: dict[str, Any] | None = Field(default=None, description="Resolved training settings.")
    code_version: str | None = Field(default=None, description="Code that trained it (git sha or package version).")
    metrics: dict[str, Any] | None = Field(default=None, description="Training metrics (final loss, steps, ...).")
    job_id: str | None = Field(default=None, description="Ray job or run that produced the version.")


class ModelVersion(BaseModel):
    """One immutable version of a model, as recorded in the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name.")
    version: int = Field(description="Version number, monotonic per name and never reused.")
    fingerprint: str = Field(
        description="sha256 (hex) of the canonical JSON of the manifest: same files, same fingerprint."
    )
    manifest: dict[str, FileEntry] = Field(description="Relative path -> {sha256, size} of every file.")
    created_at: datetime = Field(description="When the version became visible (UTC).")
    created_by: str = Field(default="user", description="Actor that registered it.")
    parent: int | None = Field(default=None, description="Version of the same model it was derived from.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata given at registration.")
    lineage: dict[str, Any] = Field(
        default_factory=dict, description="snapshot_id, training_config, code_version, metrics."
    )
    annotations: dict[str, Any] = Field(
        default_factory=dict, description="JSON attached after registration: evaluation report, gate decision, ..."
    )
    uri: str = Field(description="Storage URI of the version directory.")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at this version.")
    deleted_at: datetime | None = Field(default=None, description="Set when the artifacts were deleted (lineage only).")

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def size_bytes(self) -> int:
        return sum(int(e["size"]) for e in self.manifest.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: the fields plus ``ref`` and ``size_bytes`` (the CLI's ``--json`` keys)."""
        out = self.model_dump(mode="json")
        out["ref"] = self.ref
        out["size_bytes"] = self.size_bytes
        return out


def ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def iso(value: float | None) -> str | None:
    """UNIX seconds -> ISO 8601 UTC string (what dict-shaped results carry)."""
    d = ts(value)
    # same shape as pydantic's datetime JSON ("...Z"), so every --json output agrees
    return None if d is None else d.isoformat().replace("+00:00", "Z")
