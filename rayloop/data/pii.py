"""Scrub personal data and secrets from training text, counting what was removed.

Three kinds are recognised, each replaced by a placeholder the model can learn
harmlessly (``<email>``, ``<phone>``, ``<secret>``):

- e-mail addresses;
- phone numbers: 9-15 digits, optionally with ``+``, spaces, dots, dashes and
  one parenthesised area code (years and short numbers are left alone);
- API-key-like strings: well-known prefixes (``sk-``, ``AKIA``, ``ghp_``,
  ``xox?-``, ``AIza``, ``hf_``, ...) or a ``key=``/``token:`` assignment of a
  long opaque value.

    >>> scrub("mail bob@example.com or call +1 (555) 123-4567")
    ('mail <email> or call <phone>', {'email': 1, 'phone': 1, 'secret': 0})
"""

from __future__ import annotations

import re
from collections.abc import Callable

PII_KINDS = ("email", "phone", "secret")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# Known key prefixes, then generic "api_key = <long opaque value>" assignments.
_SECRET = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,}|hf_[A-Za-z0-9]{30,}|rl-[A-Za-z0-9]{24,})\b"
    r"|(?i:\b(?:api[_-]?key|secret|token|password|passwd|bearer)\b\s*[:=]?\s*)[A-Za-z0-9_\-./+]{16,}"
)
# A run of digits with separators; judged by its digit count below.
_PHONE = re.compile(r"(?<![\w.])\+?\d[\d\s().-]{7,}\d(?![\w])")


def _phone_like(m: re.Match[str]) -> bool:
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    return 9 <= digits <= 15 and s.count("(") <= 1 and s.count(")") <= 1


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """Return ``text`` with PII replaced, and how many of each kind were found."""
    counts = dict.fromkeys(PII_KINDS, 0)
    if not text:
        return text, counts

    def sub(kind: str, placeholder: str) -> Callable[[re.Match[str]], str]:
        def repl(m: re.Match[str]) -> str:
            if kind == "phone" and not _phone_like(m):
                return m.group(0)
            counts[kind] += 1
            return placeholder

        return repl

    # Secrets first: a key can contain digit runs that look like phone numbers.
    text = _SECRET.sub(sub("secret", "<secret>"), text)
    text = _EMAIL.sub(sub("email", "<email>"), text)
    text = _PHONE.sub(sub("phone", "<phone>"), text)
    return text, counts
