"""Model repository: immutable content-addressed versions, aliases, lineage, on any storage.

    >>> from rayloop.registry import Registry, parse_ref
    >>> parse_ref("demo@production")
    Ref(name='demo', version=None, alias='production')

See :class:`Registry` for the API and ``rayloop models --help`` for the CLI.
"""

from rayloop.registry.models import FileEntry, Lineage, ModelVersion
from rayloop.registry.names import DEFAULT_ALIAS, LATEST, Ref, parse_ref, validate_alias, validate_name
from rayloop.registry.registry import ABSENT, Registry
from rayloop.registry.rollouts import END_STATUSES, Lease, Phase, RolloutRecord, RolloutState, RolloutStatus

__all__ = [
    "ABSENT",
    "DEFAULT_ALIAS",
    "END_STATUSES",
    "LATEST",
    "FileEntry",
    "Lease",
    "Lineage",
    "ModelVersion",
    "Phase",
    "Ref",
    "Registry",
    "RolloutRecord",
    "RolloutState",
    "RolloutStatus",
    "parse_ref",
    "validate_alias",
    "validate_name",
]
