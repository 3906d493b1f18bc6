"""rayloop: a Ray-native loop that keeps a served LLM improving.

Public entry points: :mod:`rayloop.config` (settings), :mod:`rayloop.errors`
(the exception tree), :mod:`rayloop.registry` (model repository), and the
``rayloop`` CLI (:mod:`rayloop.cli`).
"""

__version__ = "0.1.0"
