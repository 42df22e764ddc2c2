"""Instruction data sources: JSON lines / JSON / Parquet in chat or Alpaca form, one clear error per
malformed record, and the built-in python-stdlib-docstrings set."""

import inspect
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distllm.data.docstrings import DOCSTRINGS, docstring_pairs, first_paragraph
from distllm.data.instructions import read_examples
from distllm.errors import DataError

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Bye."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
ALPACA_NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Red."}


def write_jsonl(path: Path, rows: list, raw: dict | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for lineno, text in (raw or {}).items():
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_chat_and_alpaca_records_from_jsonl_json_and_parquet(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [CHAT, ALPACA], raw={2: ""})  # a blank line is skipped
    (tmp_path / "b.json").write_text(json.dumps([ALPACA_NO_INPUT]))
    pq.write_table(pa.Table.from_pylist([CHAT]), tmp_path / "c.parquet")
    examples = list(read_examples(str(tmp_path)))
    assert [e.where for e in examples] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'a.jsonl'}:3",
                                          f"{tmp_path / 'b.json'}[0]", f"{tmp_path / 'c.parquet'} row 0"]
    assert examples[0].messages == CHAT["messages"] == examples[3].messages
    assert examples[1].messages == [{"role": "user", "content": "Add the numbers.\n\n### Input:\n2 3"},
                                    {"role": "assistant", "content": "5"}]
    assert examples[2].messages == [{"role": "user", "content": "Name a colour."},
                                    {"role": "assistant", "content": "Red."}]
    assert [e.where for e in read_examples(str(tmp_path), max_examples=2)] == [e.where for e in examples[:2]]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"', "not valid JSON"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}', "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}', "empty assistant turn"),
    ('{"instruction": "q", "output": ""}', "'output' is empty"),
    ('{"instruction": "q", "output": 5}', "'output' holds int"),
    ('{"prompt": "q", "completion": "a"}', "expected 'messages'"),
    ('["q", "a"]', "expected a JSON object"),
])
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, ALPACA], raw={3: line})
    with pytest.raises(DataError, match=message) as e:
        list(read_examples(str(path)))
    assert str(e.value).startswith(f"{path}:3: ")


def test_missing_source_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="instruction data not found"):
        list(read_examples(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="no .jsonl, .json, .parquet files"):
        list(read_examples(str(tmp_path)))


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_docstrings_signature_and_first_paragraph():
    files = [str(STDLIB / f) for f in ("json/__init__.py", "json/encoder.py", "textwrap.py", "_pydecimal.py")]
    pairs = dict(docstring_pairs(files))
    assert pairs == dict(docstring_pairs(files))  # deterministic
    assert not any(k.startswith("_pydecimal") for k in pairs)  # private modules are left out
    import json as json_module
    import textwrap

    # the signature as inspect gives it, the docstring's first paragraph on one line
    sig = inspect.signature(textwrap.indent)
    assert pairs[f"textwrap.indent{sig}"] == first_paragraph(inspect.getdoc(textwrap.indent))
    assert pairs["textwrap.indent(text, prefix, predicate=None)"].startswith("Adds 'prefix' to the beginning")
    # a method: self is dropped
    method = "json.encoder.JSONEncoder.encode(o)"
    assert pairs[method] == first_paragraph(inspect.getdoc(json_module.JSONEncoder.encode))
    assert not any(k.startswith("json.dumps(") for k in pairs)  # its signature is longer than 100 characters
    assert all("._" not in k.split("(")[0] for k in pairs)  # no private names
    assert all(20 <= len(v) <= 400 and "\n" not in v for v in pairs.values())


def test_the_builtin_source_gives_alpaca_conversations(monkeypatch):
    from distllm.data import docstrings

    monkeypatch.setattr(docstrings, "stdlib_files", lambda: [str(STDLIB / "textwrap.py")])
    examples = list(read_examples(DOCSTRINGS))
    assert len(examples) >= 5 and examples[0].where == f"{DOCSTRINGS}[0]"
    assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in examples)
    assert examples[0].messages[0]["content"].startswith("textwrap.")
