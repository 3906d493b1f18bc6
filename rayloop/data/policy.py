"""Which interactions become training data, and with what answer.

The policy turns one interaction plus the feedback on it into a decision:

==================  ===========================================  ===========
feedback            what happens                                 label
==================  ===========================================  ===========
a correction        the correction replaces the completion       corrected
rating >= min       the completion is kept                       positive
rating < min        the row is dropped                           negative
none                kept or dropped per ``DataSettings.unrated``  unrated /
                                                                 unrated_dropped
==================  ===========================================  ===========

Rows that failed (``status != "ok"``) or have no prompt/answer text are
dropped as ``error``/``empty`` before feedback is looked at.

    >>> from rayloop.config import DataSettings
    >>> decide(DataSettings(), status="ok", completion="x", rating=-1, correction="y")
    ('y', 'corrected')
"""

from __future__ import annotations

from rayloop.config import DataSettings, UnratedPolicy

KEPT_LABELS = ("corrected", "positive", "unrated")
DROPPED_LABELS = ("error", "empty", "negative", "unrated_dropped")
LABELS = KEPT_LABELS + DROPPED_LABELS


def decide(
    settings: DataSettings,
    *,
    status: str | None,
    completion: str | None,
    rating: int | None,
    correction: str | None,
) -> tuple[str | None, str]:
    """Return ``(response to train on or None, label)`` for one interaction."""
    if status != "ok":
        return None, "error"
    if correction is not None and correction.strip():
        return correction, "corrected"
    if completion is None or not completion.strip():
        return None, "empty"
    if rating is None:
        if settings.unrated == UnratedPolicy.KEEP:
            return completion, "unrated"
        return None, "unrated_dropped"
    if rating >= settings.min_positive_rating:
        return completion, "positive"
    return None, "negative"
