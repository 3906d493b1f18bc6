"""Typed values passed between the ingress, the engine replicas and the deploy path."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rayloop.errors import ConfigError

VERSION_HEADER = "x-rayloop-model-version"
REQUEST_ID_HEADER = "x-rayloop-request-id"
SESSION_HEADER = "x-rayloop-session-id"
USER_HEADER = "x-rayloop-user-id"
CAPTURE_HEADER = "x-rayloop-capture"  # "off": nothing of this request is stored

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def served_model_id(name: str, version: int) -> str:
    """What responses put in ``model``: ``NAME@vN``."""
    return f"{name}@v{version}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"demo@3"`` -> ``("demo", "3")``; ``"demo"`` -> ``("demo", None)``."""
    name, sep, rest = ref.partition("@")
    if not _NAME.match(name) or (sep and not rest):
        raise ConfigError(
            f"model reference {ref!r} is not NAME or NAME@REF",
            hint="Use e.g. demo, demo@3 or demo@production (names: letters, digits, '.', '_', '-').",
        )
    return name, (rest or None)


class ModelConfig(BaseModel):
    """An engine replica's ``user_config``: which version it must serve.

    Changing it through Serve's declarative path moves replicas to the new
    version in place (see :meth:`rayloop.serving.server.LLMServer.reconfigure`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Registry model name.")
    version: int = Field(ge=1, description="Version number.")
    fingerprint: str | None = Field(
        default=None, description="Expected sha256 fingerprint of the version's files (checked before loading)."
    )
    path: str | None = Field(
        default=None, description="Local model directory to load instead of fetching the version from the registry."
    )
    parked: bool = Field(
        default=False,
        description="Kept loaded but serving no traffic (a released rollout slot under rollout.keep_warm_slots): "
        "the next version given to this slot is swapped into the running engine.",
    )

    @field_validator("model")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"model name {v!r} is invalid (letters, digits, '.', '_', '-'; at most 64)")
        return v

    @field_validator("fingerprint")
    @classmethod
    def _check_fp(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError(f"fingerprint {v!r} is not a sha256 hex digest")
        return v

    @property
    def served_id(self) -> str:
        return served_model_id(self.model, self.version)

    def user_config(self) -> dict[str, Any]:
        """As a deployment's ``user_config``: unset fields left out, ``parked`` only when set."""
        out = self.model_dump(exclude_none=True)
        if not self.parked:
            del out["parked"]
        return out


@dataclass
class ReplyHead:
    """First item an engine replica streams back for a request."""

    status: int
    model: str
    version: int
    body: dict[str, Any] | None = None  # full JSON body unless streaming
    streaming: bool = False
    tail: ReplyTail | None = None  # set when the answer is complete (non-streaming)


@dataclass
class ReplyTail:
    """Last item: what the ingress needs for capture and metrics."""

    prompt_tokens: int | None = None
    completion_tokens: int = 0
    ttft_ms: float | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    choices: list[str] | None = None  # each choice's own text when there were several (n > 1, batch prompts)


def openai_error(status: int, message: str, err_type: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI-style error body."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}
