from __future__ import annotations

import pytest

from rayloop.errors import InvalidNameError
from rayloop.registry import Ref, parse_ref, validate_alias, validate_name


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("demo", Ref("demo", None, "production")),
        ("demo@3", Ref("demo", 3, None)),
        ("demo@v12", Ref("demo", 12, None)),
        ("demo@production", Ref("demo", None, "production")),
        ("demo@canary", Ref("demo", None, "canary")),
        ("demo@latest", Ref("demo", None, "latest")),
        ("my-model_2.1@shadow", Ref("my-model_2.1", None, "shadow")),
    ],
)
def test_parse_ref(ref: str, expected: Ref) -> None:
    assert parse_ref(ref) == expected
    assert parse_ref(expected) is expected


def test_ref_str_round_trips() -> None:
    assert str(parse_ref("demo@3")) == "demo@3"
    assert str(parse_ref("demo")) == "demo@production"


@pytest.mark.parametrize(
    "name", ["", "../etc", "a/b", "a\\b", "a b", ".hidden", "-x", "_x", "x" * 65, "a..b", "é", "demo\n", "a:b"]
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError) as ei:
        validate_name(name)
    assert ei.value.hint  # the error says what names look like


@pytest.mark.parametrize("ref", ["", "@3", "demo@", "demo@0", "demo@../x", "../x@1", "demo@a b", "demo@1@2"])
def test_bad_refs_are_refused(ref: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_ref(ref)


@pytest.mark.parametrize("alias", ["3", "v3", "latest", "", "a/b"])
def test_reserved_or_bad_aliases_are_refused(alias: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_alias(alias)


def test_good_names_pass() -> None:
    assert validate_name("demo") == "demo"
    assert validate_name("Llama-3.1_8B") == "Llama-3.1_8B"
    assert validate_alias("production") == "production"
    assert validate_alias("blue-2") == "blue-2"
