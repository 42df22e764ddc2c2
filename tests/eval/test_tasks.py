"""Task files: the field names of HellaSwag, ARC, PIQA and SciQ as they come, and one clear error
naming the file and line for anything malformed."""

import json

import pytest

from distllm.errors import DataError
from distllm.eval.tasks import load_task, load_tasks


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_common_sets_load_as_they_come(tmp_path):
    hellaswag = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                 "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
                 "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3}
    hellaswag_hub = {**hellaswag, "label": "3"}  # the Hub's copy has string labels
    arc = {"id": "x", "question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "A"},
                                                                          {"text": "steam", "label": "B"}]},
           "answerKey": "B"}
    arc_hub = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
               "answerKey": "2"}
    piqa = {"goal": "Keep bread fresh", "sol1": "Store it in the oven.", "sol2": "Store it in a bag.", "label": 1}
    sciq = {"question": "What do plants make?", "distractor1": "rocks", "distractor2": "salt", "distractor3": "iron",
            "correct_answer": "sugar", "support": "..."}
    generic = {"context": "2 + 2 =", "choices": ["3", "4"], "answer": "4"}  # the gold as its text
    task = load_task(write(tmp_path / "mixed.val.jsonl", [hellaswag, hellaswag_hub, "", arc, arc_hub, piqa, sciq,
                                                          generic]))
    assert task.name == "mixed" and len(task) == 7  # the blank line is skipped
    a, b, c, d, e, f, g = task.items
    assert a.context == "A man is sitting on a roof. he" and a.gold == 3 and len(a.choices) == 4 and b.gold == 3
    assert c.context == "Which is a gas?" and c.choices == ("ice", "steam") and c.gold == 1
    assert d.choices == ("ice", "steam", "rock") and d.gold == 1  # "2" is a label here, not an index
    assert e.context == "Keep bread fresh" and e.choices == ("Store it in the oven.", "Store it in a bag.") and e.gold == 1
    assert f.choices == ("rocks", "salt", "iron", "sugar") and f.gold == 3  # lm-evaluation-harness's order
    assert g.gold == 1
    assert [i.index for i in task.items] == list(range(7))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('["a", "b"]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"choices": ["a"], "label": 0}', r"bad\.jsonl:2: no context field"),
    ('{"context": "c", "label": 0}', r"bad\.jsonl:2: no choices field"),
    ('{"context": "c", "choices": ["a", "b"]}', r"bad\.jsonl:2: no label field"),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', r"bad\.jsonl:2: label 'label' = 2 is out of range for 2"),
    ('{"context": "c", "choices": ["a", "b"], "label": -1}', r"bad\.jsonl:2: label 'label' = -1 is out of range"),
    ('{"context": "c", "choices": ["a", "b"], "answer": "zzz"}', r"bad\.jsonl:2: label 'answer' = \"zzz\" is neither"),
    ('{"context": 3, "choices": ["a"], "label": 0}', r"bad\.jsonl:2: field 'context' must be a string"),
    ('{"context": "c", "choices": [1, 2], "label": 0}', r"bad\.jsonl:2: field 'choices' must be a list of strings"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [{"context": "fine", "choices": ["x", "y"], "label": 0}, line])
    with pytest.raises(DataError, match=message):
        load_task(path)


def test_missing_empty_and_duplicate_task_files(tmp_path):
    with pytest.raises(DataError, match="task file not found"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no items"):
        load_task(write(tmp_path / "empty.jsonl", [""]))
    (tmp_path / "a").mkdir()
    one = write(tmp_path / "t.jsonl", [{"context": "c", "choices": ["x"], "label": 0}])
    two = write(tmp_path / "a" / "t.jsonl", [{"context": "c", "choices": ["x"], "label": 0}])
    with pytest.raises(DataError, match="two task files are named 't'"):
        load_tasks(f"{one},{two}")
    assert [t.name for t in load_tasks(f" {one} ,")] == ["t"]
