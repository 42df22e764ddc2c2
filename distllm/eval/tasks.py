"""Multiple-choice task files: JSON lines, one item a line (a context, its choices, the correct one).

The field names of the common sets are understood as they come, so their files need no conversion:

    context  ``query``, ``ctx``, ``context``, ``question``, ``goal`` or ``prompt`` (the first present);
             ARC's ``{"question": {"stem": ..., "choices": [...]}}`` too
    choices  ``choices`` / ``endings`` / ``options``: a list of strings, a list of ``{"text", "label"}``
             (ARC) or ``{"text": [...], "label": [...]}`` (ARC on the Hugging Face Hub);
             ``sol1``, ``sol2``, ... (PIQA); ``distractor1..3`` + ``correct_answer`` (SciQ: the correct
             answer is the last choice, as lm-evaluation-harness orders them)
    label    ``label``, ``gold``, ``answer`` or ``answerKey``: the index of the correct choice (an
             integer or a string of digits), one of the choices' labels (``"B"``), or the text of the
             correct choice (a string ``answer`` equal to a choice is taken as its text first)

The context is used verbatim: to reproduce a published prompt (e.g. lm-evaluation-harness's
``"Question: {question}\\nAnswer:"``), write that text into ``context``. A task is named after its
file (``hellaswag_val.jsonl`` -> ``hellaswag_val``). A line that is not JSON, lacks a field, or
has a label out of range is a ``DataError`` naming the file and the line number; blank lines are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from distllm.errors import DataError

CONTEXT_FIELDS = ("query", "ctx", "context", "question", "goal", "prompt")
CHOICE_FIELDS = ("choices", "endings", "options")
LABEL_FIELDS = ("label", "gold", "answer", "answerKey")


@dataclass(frozen=True)
class Item:
    index: int
    """Position in the task file (0-based, blank lines not counted)."""
    context: str
    choices: tuple[str, ...]
    gold: int
    """Index of the correct choice."""


@dataclass
class Task:
    name: str
    path: str
    items: list[Item]
    sha256: str = ""
    """Of the file's bytes: a contamination report names the exact file it checked."""
    _encoded: dict = field(default_factory=dict, repr=False, compare=False)
    """Encodings cached per (tokenizer fingerprint, delimiter, max length) by ``multiple_choice``."""

    def __len__(self) -> int:
        return len(self.items)


def load_task(path: str | os.PathLike) -> Task:
    """Read one task file (see the module doc); DataError naming file and line for anything malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"task file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read task file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
        items.append(parse_item(doc, len(items), f"{path}:{lineno}"))
    if not items:
        raise DataError(f"task file {path} holds no items")
    return Task(name=path.name.split(".")[0] or path.name, path=str(path), items=items,
                sha256=hashlib.sha256(raw).hexdigest())


def load_tasks(paths: str | list) -> list[Task]:
    """Task files from a list or a comma-separated string; two files of the same name are an error."""
    if isinstance(paths, str):
        paths = [p for p in (s.strip() for s in paths.split(",")) if p]
    if not paths:
        raise DataError("no task files given (--tasks A.jsonl,B.jsonl)")
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"two task files are named {dup!r} ({', '.join(t.path for t in tasks if t.name == dup)}); "
                        "rename one: tasks are reported by file name")
    return tasks


def parse_item(doc: dict, index: int, where: str) -> Item:
    """One item from a parsed line (``where`` = "file:line", for errors)."""
    question = doc.get("question")
    if isinstance(question, dict):  # ARC's original files: {"stem": ..., "choices": [...]}
        doc = {**doc, "question": question.get("stem"), "choices": doc.get("choices", question.get("choices"))}
    ctx_key = next((k for k in CONTEXT_FIELDS if k in doc), None)
    if ctx_key is None:
        raise DataError(f"{where}: no context field (one of {', '.join(CONTEXT_FIELDS)})")
    context = doc[ctx_key]
    if not isinstance(context, str):
        raise DataError(f"{where}: field {ctx_key!r} must be a string, got {type(context).__name__}")
    choices, labels = _choices(doc, where)
    gold = _gold(doc, choices, labels, where)
    return Item(index=index, context=context, choices=tuple(choices), gold=gold)


def _choices(doc: dict, where: str) -> tuple[list[str], list[str] | None]:
    """(choice texts, choice labels or None)."""
    key = next((k for k in CHOICE_FIELDS if k in doc), None)
    if key is not None:
        value = doc[key]
        labels = None
        if isinstance(value, dict):  # {"text": [...], "label": [...]}
            labels, value = value.get("label"), value.get("text")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            labels, value = [v.get("label") for v in value], [v.get("text") for v in value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: field {key!r} must be a list of strings (or of {{\"text\", \"label\"}})")
        if labels is not None and (len(labels) != len(value) or not all(isinstance(x, (str, int)) for x in labels)):
            labels = None
        choices = value
    elif "sol1" in doc:  # PIQA
        choices = [doc[f"sol{i}"] for i in range(1, 100) if f"sol{i}" in doc]
        labels = None
    elif "correct_answer" in doc and "distractor1" in doc:  # SciQ, in lm-evaluation-harness's order
        choices = [doc[f"distractor{i}"] for i in (1, 2, 3) if f"distractor{i}" in doc] + [doc["correct_answer"]]
        labels = None
    else:
        raise DataError(f"{where}: no choices field (one of {', '.join(CHOICE_FIELDS)}, sol1.., distractor1..)")
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: every choice must be a string")
    if len(choices) < 1:
        raise DataError(f"{where}: the item has no choices")
    return choices, [str(x) for x in labels] if labels is not None else None


def _gold(doc: dict, choices: list[str], labels: list[str] | None, where: str) -> int:
    key = next((k for k in LABEL_FIELDS if k in doc), None)
    if key is None:
        if "correct_answer" in doc and "distractor1" in doc:
            return len(choices) - 1  # SciQ: the correct answer is placed last
        raise DataError(f"{where}: no label field (one of {', '.join(LABEL_FIELDS)})")
    value = doc[key]
    n = len(choices)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: label {key!r} must be an integer index or a string, got {json.dumps(value)}")
    if isinstance(value, str):
        text = value.strip()
        if labels is not None and text in labels:
            return labels.index(text)
        if key == "answer" and value in choices:  # the text of the correct choice
            return choices.index(value)
        if text.lstrip("-").isdigit():
            value = int(text)
        elif len(text) == 1 and text.isalpha() and text.isupper() and labels is None:
            value = ord(text) - ord("A")
        elif value in choices:
            return choices.index(value)
        else:
            raise DataError(f"{where}: label {key!r} = {json.dumps(doc[key])} is neither a choice index, a choice "
                            f"label{' (' + ', '.join(labels) + ')' if labels else ''}, nor the text of a choice")
    if not 0 <= value < n:
        raise DataError(f"{where}: label {key!r} = {json.dumps(doc[key])} is out of range for {n} choices")
    return value


def write_lm_eval_task(task: Task, out_dir: str | os.PathLike, delimiter: str = " ") -> Path:
    """Write ``task`` as a folder lm-evaluation-harness 0.4 runs offline with ``--include_path out_dir
    --tasks NAME``: the items as JSON lines (context, choices, gold) and a task YAML that scores them
    as ``output_type: multiple_choice`` with acc and acc_norm. Returns the YAML's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task.name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for item in task.items:
            f.write(json.dumps({"context": item.context, "choices": list(item.choices), "gold": item.gold}) + "\n")
    yaml = out / f"{task.name}.yaml"
    yaml.write_text(
        f"task: {task.name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        f"target_delimiter: {json.dumps(delimiter)}\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml
