"""Training records from files (external data, a model's replay.jsonl): every format, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayloop.data.records import read_pairs, write_pairs_jsonl
from rayloop.data.replay import ReplaySource
from rayloop.errors import DataError


def test_chat_completion_and_question_answer_records(tmp_path: Path) -> None:
    f = tmp_path / "extra.jsonl"
    lines = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
            ]
        },
        {"prompt": "Q2", "completion": "A2"},
        {"question": "Q3", "answer": "A3"},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_pairs(str(f)) == [("Q1", "A1"), ("Q2", "A2"), ("Q3", "A3")]
    p = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "completion": ["A"]}), p)
    assert read_pairs(str(p)) == [("Q", "A")]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"messages": [{"role": "user", "content": "Q"}]}', "needs an assistant message"),
        ('{"prompt": "Q", "completion": ""}', "non-empty strings"),
        ('{"text": "Q"}', "needs 'messages'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_a_bad_record_names_the_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    f = tmp_path / "extra.jsonl"
    f.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"extra.jsonl, line 2: .*{why}"):
        read_pairs(str(f))


def test_a_model_directory_ships_its_replay_pairs(tmp_path: Path) -> None:
    assert ReplaySource.from_model_dir(tmp_path) is None
    (tmp_path / "replay.jsonl").write_bytes(write_pairs_jsonl([("Q", "A"), ("Q2", "A2")]))
    src = ReplaySource.from_model_dir(tmp_path)
    assert src is not None and src.pairs == [("Q", "A"), ("Q2", "A2")]
