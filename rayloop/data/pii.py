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

Scrubbing takes time linear in the text's length, whatever the text: it runs
on user-supplied prompts and corrections (adversarial inputs are in
``tests/unit/test_data_pii_policy.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

PII_KINDS = ("email", "phone", "secret")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# The same matches as _EMAIL, in linear time. _EMAIL tried from every word start of a run of local-part
# characters, and each try read the run to its end to look for the '@' (quadratic on "a.a.a.…" without one).
# This one starts only where such a run starts, reads the characters before the run's first word boundary
# (where _EMAIL's match starts) possessively into `skip`, and the local part up to the '@' possessively.
_EMAIL_RUN = re.compile(
    r"(?<![A-Za-z0-9._%+-])(?P<skip>|(?<=\w)[A-Za-z0-9_]++|(?<!\w)[.%+-]++)"
    r"(?P<email>\b[A-Za-z0-9._%+-]++@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b)"
)
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
# Known key prefixes, then generic "api_key = <long opaque value>" assignments.
_SECRET = re.compile(
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,}|hf_[A-Za-z0-9]{30,}|rl-[A-Za-z0-9]{24,})\b"
    # Possessive separators: "token" and 20k spaces took seconds with \s*[:=]?\s* (the value holds no
    # white space, ':' or '=', so giving any of them back never helped a match).
    r"|(?i:\b(?:api[_-]?key|secret|token|password|passwd|bearer)\b\s*+[:=]?+\s*+)[A-Za-z0-9_\-./+]{16,}"
)
# A run of digits with separators; judged by its digit count below. Linear as it is: a start fails only if no
# digit 9 or more characters on in its run is followed by a non-word character, which few starts per run can.
_PHONE = re.compile(r"(?<![\w.])\+?\d[\d\s().-]{7,}\d(?![\w])")


def _sub_emails(text: str, placeholder: str) -> tuple[str, int]:
    """``_EMAIL.subn(placeholder, text)``, in linear time.

    One case needs more than :data:`_EMAIL_RUN`: an address may start right where the previous one ended,
    inside a run of local-part characters (``a@b.com.x@c.com`` holds two); ``_EMAIL`` is tried there once.
    """
    out: list[str] = []
    pos = done = 0
    while True:
        m = _EMAIL.match(text, pos) if 0 < pos < len(text) and text[pos] in _EMAIL_LOCAL else None
        if m is not None:
            start, end = m.span()
        else:
            run = _EMAIL_RUN.search(text, pos)
            if run is None:
                break
            start, end = run.span("email")
        out += (text[done:start], placeholder)
        pos = done = end
    if not out:
        return text, 0
    out.append(text[done:])
    return "".join(out), len(out) // 2


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
    text, counts["email"] = _sub_emails(text, "<email>")
    text = _PHONE.sub(sub("phone", "<phone>"), text)
    return text, counts
