"""Multiple-choice questions from ARC, OpenBookQA or a generic file, one layout detected per row.

Three row layouts are read (any of them in .jsonl, .json list, .parquet, as
sdpo_jax.data.sources reads files):

- generic: ``{"question": str, "choices": [str, ...], "answer": i}`` where ``answer`` is the
  0-based index of the right choice or its letter ("A" is the first choice, "B" the second, ...);
- ARC: ``{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": label}``;
- OpenBookQA: ``{"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey": label}``.

A row with ``answerKey`` is labelled (ARC or OpenBookQA: the question is an object with a stem
or a string beside the choices, and either shape of labelled choices is accepted); a row with
``answer`` is generic. Labels are matched exactly, so ARC's rows labelled "1".."4" work as they
are. Every problem is a one-line `DataError` naming the file, line (row for .json lists) and
field, e.g. ``data error: arc.json row 3, field 'answerKey': answer label 'E' is not among the
choice labels A, B, C, D``.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

from sdpo_jax.data.errors import DataError, Location, type_name
from sdpo_jax.data.sources import read_source
from sdpo_jax.data.validation import require_text


@dataclasses.dataclass(frozen=True)
class ChoiceQuestion:
    """One question, its choice texts and the index of the right one; ``where`` for messages."""

    question: str
    choices: tuple[str, ...]
    answer: int
    where: Location


def load_choice_questions(path: str, limit: int | None = None) -> list[ChoiceQuestion]:
    """The questions of ``path`` (the first ``limit`` rows when given); stops at the first bad row."""
    if limit is not None and limit < 1:
        raise DataError(path, f"limit must be positive, got {limit}", reason="invalid setting")
    source = read_source(path, default_split="validation", limit=limit or 0)
    questions = []
    for record in source.records:
        if isinstance(record.value, DataError):
            raise record.value
        questions.append(parse_question(record.value, record.where))
    return questions


def parse_question(row: dict, where: Location) -> ChoiceQuestion:
    """A `ChoiceQuestion` from one raw row of any of the three layouts."""
    if "answerKey" in row:
        return _labelled(row, where)
    if "answer" in row:
        return _generic(row, where)
    raise DataError(
        where,
        "missing: expected 'answer' (generic layout) or 'answerKey' (ARC/OpenBookQA layout)",
        "answer",
        reason="missing field",
    )


def _generic(row: dict, where: Location) -> ChoiceQuestion:
    question = require_text(_get(row, "question", where), where, "question")
    choices = _get(row, "choices", where)
    if not isinstance(choices, list):
        raise DataError(
            where, f"expected a list of choice texts, got {type_name(choices)}", "choices", reason="wrong type"
        )
    texts = tuple(require_text(text, where, f"choices[{i}]") for i, text in enumerate(choices))
    _require_two(texts, where, "choices")
    answer = row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(texts):
            raise DataError(
                where, f"answer index {answer} is outside 0..{len(texts) - 1}", "answer", reason="bad answer"
            )
        return ChoiceQuestion(question, texts, answer, where)
    if isinstance(answer, str):
        return ChoiceQuestion(
            question, texts, _label_index(answer, _letters(len(texts), where), where, "answer"), where
        )
    raise DataError(
        where,
        f"expected a choice index (int) or letter (string), got {type_name(answer)}",
        "answer",
        reason="wrong type",
    )


def _labelled(row: dict, where: Location) -> ChoiceQuestion:
    question = _get(row, "question", where)
    if isinstance(question, dict):  # OpenBookQA: {"stem", "choices"}
        text = require_text(_get(question, "stem", where, "question.stem"), where, "question.stem")
        field, choices = "question.choices", _get(question, "choices", where, "question.choices")
    else:  # ARC: the question string beside the choices
        text = require_text(question, where, "question")
        field, choices = "choices", _get(row, "choices", where)
    texts, labels = _labelled_choices(choices, where, field)
    answer_key = row["answerKey"]
    if not isinstance(answer_key, str):
        raise DataError(
            where, f"expected a choice label (string), got {type_name(answer_key)}", "answerKey", reason="wrong type"
        )
    return ChoiceQuestion(text, texts, _label_index(answer_key, labels, where, "answerKey"), where)


def _labelled_choices(choices: Any, where: Location, field: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(texts, labels) from ``{"text": [...], "label": [...]}`` or ``[{"text", "label"}, ...]``."""
    if isinstance(choices, dict):
        texts, labels = _get(choices, "text", where, f"{field}.text"), _get(choices, "label", where, f"{field}.label")
        for name, value in (("text", texts), ("label", labels)):
            if not isinstance(value, list):
                raise DataError(
                    where, f"expected a list, got {type_name(value)}", f"{field}.{name}", reason="wrong type"
                )
        if len(texts) != len(labels):
            raise DataError(
                where, f"{len(texts)} texts but {len(labels)} labels", f"{field}.label", reason="bad choices"
            )
        pairs = [(t, lab, f"{field}.text[{i}]", f"{field}.label[{i}]") for i, (t, lab) in enumerate(zip(texts, labels))]
    elif isinstance(choices, list):
        pairs = []
        for i, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise DataError(
                    where,
                    f"expected a {{text, label}} object, got {type_name(choice)}",
                    f"{field}[{i}]",
                    reason="wrong type",
                )
            pairs.append(
                (
                    _get(choice, "text", where, f"{field}[{i}].text"),
                    _get(choice, "label", where, f"{field}[{i}].label"),
                    f"{field}[{i}].text",
                    f"{field}[{i}].label",
                )
            )
    else:
        raise DataError(where, f"expected labelled choices, got {type_name(choices)}", field, reason="wrong type")
    texts = tuple(require_text(text, where, text_field) for text, _, text_field, _ in pairs)
    labels = tuple(require_text(label, where, label_field).strip() for _, label, _, label_field in pairs)
    _require_two(texts, where, field)
    if len(set(labels)) != len(labels):
        raise DataError(where, f"choice labels repeat: {', '.join(labels)}", field, reason="bad choices")
    return texts, labels


def _label_index(label: str, labels: tuple[str, ...], where: Location, field: str) -> int:
    if label.strip() not in labels:
        raise DataError(
            where,
            f"answer label {label!r} is not among the choice labels {', '.join(labels)}",
            field,
            reason="bad answer",
        )
    return labels.index(label.strip())


def _letters(count: int, where: Location) -> tuple[str, ...]:
    if count > len(string.ascii_uppercase):
        raise DataError(
            where, f"{count} choices have no letter labels; give the answer as an index", "answer", reason="bad answer"
        )
    return tuple(string.ascii_uppercase[:count])


def _require_two(texts: tuple[str, ...], where: Location, field: str) -> None:
    if len(texts) < 2:
        raise DataError(where, f"expected at least 2 choices, got {len(texts)}", field, reason="bad choices")


def _get(row: dict, key: str, where: Location, field: str | None = None) -> Any:
    if key not in row:
        raise DataError(where, "missing", field or key, reason="missing field")
    return row[key]
