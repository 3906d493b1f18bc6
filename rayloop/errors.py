"""The rayloop exception tree.

Every error a user can cause or fix is one of these. Each carries a one-line
``message`` saying what was wrong and a ``hint`` saying what to do next; the
CLI prints ``Type: message`` and the hint, and exits non-zero (the traceback
only with ``RAYLOOP_DEBUG=1``).

    RayloopError
    ├── ConfigError                  settings file, env var or CLI value is invalid
    ├── ClusterError                 no Ray cluster to attach to, or it failed
    ├── RegistryError
    │   ├── NotFoundError            model, version or alias does not exist
    │   ├── InvalidNameError         name or alias fails validation
    │   ├── AliasConflictError       compare-and-set alias move lost a race
    │   ├── IntegrityError           an artifact is missing, truncated or tampered
    │   ├── UnsafeArtifactError      pickle weights or other refused content
    │   └── InUseError               version is aliased or deployed
    ├── DataError
    │   └── EmptyDatasetError        nothing to train or evaluate on
    ├── TrainingError
    ├── EvaluationError
    ├── ServingError
    │   └── EngineError              the inference engine failed
    └── RolloutError
        └── RolloutInProgressError   another rollout holds the model's lock
"""

from __future__ import annotations


class RayloopError(Exception):
    """Base class: ``message`` says what was wrong, ``hint`` what to do."""

    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class ConfigError(RayloopError):
    default_hint = (
        "Check rayloop.yaml and RAYLOOP_* environment variables; `rayloop config show` prints the resolved settings."
    )


class ClusterError(RayloopError):
    default_hint = "Start a local cluster with `rayloop up`, or set RAY_ADDRESS to a running one."


class RegistryError(RayloopError):
    pass


class NotFoundError(RegistryError):
    default_hint = "List what exists with `rayloop models list`."


class InvalidNameError(RegistryError):
    default_hint = (
        "Names use letters, digits, '-', '_' and '.', start with a letter or digit, and are at most 64 characters."
    )


class AliasConflictError(RegistryError):
    default_hint = "Someone moved the alias meanwhile; re-read it with `rayloop models show` and retry."


class IntegrityError(RegistryError):
    default_hint = "The stored artifact does not match its manifest; re-register the model from a good copy."

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class UnsafeArtifactError(RegistryError):
    default_hint = "Save weights as safetensors (`model.save_pretrained(dir, safe_serialization=True)`)."


class InUseError(RegistryError):
    default_hint = "Move the alias or undeploy the version first."


class DataError(RayloopError):
    pass


class EmptyDatasetError(DataError):
    default_hint = "Send traffic and feedback first (`rayloop demo` simulates users), or widen --since."


class TrainingError(RayloopError):
    pass


class EvaluationError(RayloopError):
    pass


class ServingError(RayloopError):
    pass


class EngineError(ServingError):
    pass


class RolloutError(RayloopError):
    pass


class RolloutInProgressError(RolloutError):
    default_hint = "Wait for it, or stop it with `rayloop abort NAME`."


class LeaseLostError(RolloutError):
    """Another controller took this rollout over (its lease had expired): this one must stop writing.

    ``stale_apply`` is set when the loss was found right *after* a Serve config went out: the holder froze
    between its last check and the apply, so that config may have overwritten its successor's.
    """

    default_hint = "Another controller owns the rollout now; see `rayloop status`."

    def __init__(self, message: str, *, hint: str | None = None, stale_apply: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.stale_apply = stale_apply
