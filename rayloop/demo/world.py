"""The demo task: facts about fictional countries, some known, some new.

The world is a deterministic function of a seed. Each country has three
attributes (capital, river, ruler) whose values are invented words, so guessing
scores zero. Countries are split in two:

- **known** countries: the base model is pre-trained on every question about
  them, in every phrasing;
- **new** countries: the base model never sees them. They appear later in user
  traffic; users correct wrong answers through ``/v1/feedback``.

Each attribute has four question templates. User traffic only ever uses the
first three (``TRAIN_TEMPLATES``); the evaluation asks in the fourth phrasing
(``HELDOUT_TEMPLATE``), so a retrained model must have learned the fact, not
the string. Accuracy is measured with greedy decoding: an answer is correct
when it contains the true value as a word.

    >>> w = World.build(seed=0)
    >>> q = w.eval_questions("new")[0]
    >>> w.is_correct(q, f"The capital of X is {q.answer}.")
    True
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

Split = Literal["known", "new"]

ATTRIBUTES: dict[str, list[str]] = {
    "capital": [
        "What is the capital of {e}?",
        "Which city is the capital of {e}?",
        "Name the capital of {e}.",
        "Tell me the capital city of {e}.",
    ],
    "river": [
        "What is the longest river in {e}?",
        "Which river is the longest in {e}?",
        "Name the longest river of {e}.",
        "Tell me the main river of {e}.",
    ],
    "ruler": [
        "Who rules {e}?",
        "Who is the ruler of {e}?",
        "Name the ruler of {e}.",
        "Tell me who governs {e}.",
    ],
}
ANSWERS: dict[str, str] = {
    "capital": "The capital of {e} is {v}.",
    "river": "The longest river in {e} is the {v}.",
    "ruler": "{e} is ruled by {v}.",
}
TRAIN_TEMPLATES = (0, 1, 2)
HELDOUT_TEMPLATE = 3

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return w.capitalize()


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    split: Split

    @property
    def fact_id(self) -> str:
        return f"{self.entity}:{self.attribute}"

    def question(self, template: int) -> str:
        return ATTRIBUTES[self.attribute][template].format(e=self.entity)

    def answer(self, value: str | None = None) -> str:
        return ANSWERS[self.attribute].format(e=self.entity, v=value or self.value)


@dataclass(frozen=True)
class Question:
    """One question with its expected answer value."""

    fact_id: str
    split: Split
    template: int
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


@dataclass
class World:
    seed: int
    facts: list[Fact] = field(default_factory=list)

    @classmethod
    def build(cls, seed: int = 0, n_known: int = 24, n_new: int = 12) -> World:
        rng = random.Random(seed)
        used: set[str] = set()

        def fresh(syl: int) -> str:
            while True:
                w = _word(rng, syl)
                if w not in used and len(w) >= 4:
                    used.add(w)
                    return w

        facts: list[Fact] = []
        for i in range(n_known + n_new):
            split: Split = "known" if i < n_known else "new"
            entity = fresh(2)
            for attr in ATTRIBUTES:
                facts.append(Fact(entity, attr, fresh(2), split))
        return cls(seed=seed, facts=facts)

    # --- views -----------------------------------------------------------
    def by_split(self, split: Split) -> list[Fact]:
        return [f for f in self.facts if f.split == split]

    def fact(self, fact_id: str) -> Fact:
        for f in self.facts:
            if f.fact_id == fact_id:
                return f
        raise KeyError(fact_id)

    def questions(self, split: Split, templates: tuple[int, ...]) -> list[Question]:
        return [
            Question(f.fact_id, f.split, t, f.question(t), f.value) for f in self.by_split(split) for t in templates
        ]

    def eval_questions(self, split: Split) -> list[Question]:
        """Held-out phrasing: never in user traffic or retraining data."""
        return self.questions(split, (HELDOUT_TEMPLATE,))

    def pretraining_pairs(self) -> list[tuple[str, str]]:
        """(question, answer) pairs the base model learns: known facts, every phrasing."""
        return [
            (f.question(t), f.answer()) for f in self.by_split("known") for t in range(len(ATTRIBUTES[f.attribute]))
        ]

    def corpus(self) -> list[str]:
        """All text of the world, for training the tokenizer."""
        out: list[str] = []
        for f in self.facts:
            for t in range(len(ATTRIBUTES[f.attribute])):
                out.append(f.question(t))
            out.append(f.answer())
        return out

    # --- scoring ---------------------------------------------------------
    @staticmethod
    def is_correct(question: Question, completion: str) -> bool:
        return re.search(rf"\b{re.escape(question.answer)}\b", completion) is not None

    def fingerprint(self) -> str:
        blob = json.dumps([asdict(f) for f in self.facts], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "facts": [asdict(f) for f in self.facts]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> World:
        d = json.loads(text)
        return cls(seed=d["seed"], facts=[Fact(**f) for f in d["facts"]])


@dataclass
class UserRequest:
    """A simulated user turn: what to send, and what the user knows is right."""

    user: str
    question: Question

    def body(self, model: str, max_tokens: int = 24) -> dict[str, object]:
        return {
            "model": model,
            "messages": self.question.messages(),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "user": self.user,
        }


class UserSimulator:
    """Generates user traffic and the feedback users give on answers.

    Users mostly ask about new countries (``new_share``), in the training
    phrasings only. A user who gets a wrong answer rates it -1 and writes the
    correct answer; a right answer gets +1. With ``poison=True`` users
    "correct" with a wrong value (another country's), which a good gate must
    catch.
    """

    def __init__(self, world: World, seed: int = 1, new_share: float = 0.8, n_users: int = 16) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.new_share = new_share
        self.users = [f"user-{i:03d}" for i in range(n_users)]
        self._new = world.questions("new", TRAIN_TEMPLATES)
        self._known = world.questions("known", TRAIN_TEMPLATES)

    def requests(self, n: int) -> Iterator[UserRequest]:
        for _ in range(n):
            pool = self._new if self.rng.random() < self.new_share else self._known
            yield UserRequest(self.rng.choice(self.users), self.rng.choice(pool))

    def covering_requests(self, repeats: int = 1) -> list[UserRequest]:
        """Every training question about new facts ``repeats`` times, shuffled."""
        out = [UserRequest(self.rng.choice(self.users), q) for q in self._new for _ in range(repeats)]
        self.rng.shuffle(out)
        return out

    def feedback(self, req: UserRequest, completion: str, poison: bool = False) -> dict[str, object]:
        fact = self.world.fact(req.question.fact_id)
        if poison:
            wrong = self.rng.choice([f for f in self.world.facts if f.attribute == fact.attribute and f != fact])
            return {"rating": -1, "correction": fact.answer(wrong.value)}
        if World.is_correct(req.question, completion):
            return {"rating": 1}
        return {"rating": -1, "correction": fact.answer()}
