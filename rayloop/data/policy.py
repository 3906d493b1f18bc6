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
DROPPED_LABELS = ("error", "empty", "negative", "unrated_dropped", "multi_choice")
LABELS = KEPT_LABELS + DROPPED_LABELS


def decide(
    settings: DataSettings,
    *,
    status: str | None,
    completion: str | None,
    rating: int | None,
    correction: str | None,
    n_choices: int = 1,
) -> tuple[str | None, str]:
    """Return ``(response to train on or None, label)`` for one interaction.

    An answer with several choices (n > 1, a batch of prompts) is never trained on as it is: a rating
    cannot say which choice it meant. A correction still is (it says what the answer should have been).
    """
    if status != "ok":
        return None, "error"
    if correction is not None and correction.strip():
        return correction, "corrected"
    if n_choices > 1:
        return None, "multi_choice"
    if completion is None or not completion.strip():
        return None, "empty"
    if rating is None:
        if settings.unrated == UnratedPolicy.KEEP:
            return completion, "unrated"
        return None, "unrated_dropped"
    if rating >= settings.min_positive_rating:
        return completion, "positive"
    return None, "negative"
