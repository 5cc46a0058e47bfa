"""Text data: CSV or JSONL with a text and a label column, validated with one-line errors.

A data reference is a file (``reviews.csv``, ``reviews.jsonl``), or a folder holding
``train`` and ``test`` (or ``val``) files of one of those kinds, optionally followed by the
column names: ``reviews.csv?text=review&label=stars``. Labels are integer class indices
(0..C-1). ``text:sentiment`` names the synthetic reviews of ``robustkit_text.synthetic``.
Files are untrusted input: their size is held to robustkit's array cap before they are read.
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qsl

from robustkit.data import over_limit
from robustkit.errors import DataError

SUFFIXES = (".csv", ".jsonl")
SYNTHETIC = "text:sentiment"
SYNTHETIC_CLASSES = ("negative", "positive")  #: label 0, label 1
EVAL_NAMES = ("test", "val")


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"


@dataclass
class TextDataset:
    """The evaluation split and, when given, a training split, as raw texts and labels."""

    name: str
    texts: list[str]
    labels: list[int]
    num_classes: int
    train_texts: list[str] | None = None
    train_labels: list[int] | None = None
    source: str = ""
    columns: Columns = field(default_factory=Columns)
    #: where each evaluation (training) sample comes from, "FILE line N", for errors; empty: unknown
    lines: list[str] = field(default_factory=list)
    train_lines: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source or self.name, "n_eval": len(self.texts),
                "n_train": len(self.train_texts or []), "num_classes": self.num_classes,
                "columns": {"text": self.columns.text, "label": self.columns.label}}


class SyntheticEntry:
    """``text:sentiment`` in robustkit's data-set registry, so that ``robustkit datasets list``
    shows it. That registry's factories make image data sets; this is text, which the text jobs
    read by name before robustkit's loader is asked, so called as a factory it refuses in one line."""

    name: ClassVar[str] = SYNTHETIC.partition(":")[2]
    kind: ClassVar[str] = "text"

    @property
    def summary(self) -> str:
        from robustkit_text.synthetic import generate

        sizes = inspect.signature(generate).parameters  # the sizes text:sentiment is made with
        return (f"synthetic template reviews: {sizes['n_train'].default:,} training, {sizes['n_eval'].default:,} "
                f"evaluation, {len(SYNTHETIC_CLASSES)} classes ({', '.join(SYNTHETIC_CLASSES)})")

    def __call__(self) -> NoReturn:
        raise DataError(f"{SYNTHETIC} is text, not images: give it with a text classifier, a Hugging Face folder "
                        "or weights with --arch and their tokenizer beside them "
                        f"(robustkit audit MODEL --data {SYNTHETIC})")


def is_text_ref(ref: str) -> bool:
    """Whether ``ref`` names text data (the text jobs take it; anything else is left to robustkit)."""
    if ref == SYNTHETIC:
        return True
    path = Path(ref.partition("?")[0]).expanduser()
    if path.suffix.lower() in SUFFIXES:
        return True
    return path.is_dir() and any((path / f"{name}{suffix}").is_file()
                                 for name in ("train", *EVAL_NAMES) for suffix in SUFFIXES)


def parse_ref(ref: str) -> tuple[Path, Columns]:
    location, _, query = ref.partition("?")
    names = {"text": "text", "label": "label"}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in names:
            raise DataError(f"data {ref!r}: unknown key {key!r}; name the columns with ?text=COLUMN&label=COLUMN")
        if not value:
            raise DataError(f"data {ref!r}: {key}= needs a column name")
        names[key] = value
    return Path(location).expanduser(), Columns(names["text"], names["label"])


def load_text_data(ref: str, limit: int | None = None) -> TextDataset:
    """The data ``ref`` names; ``limit`` keeps the first evaluation samples and no training split."""
    if ref == SYNTHETIC:
        from robustkit_text.synthetic import generate

        made = generate()
        data = TextDataset("sentiment", made.texts, made.labels, len(SYNTHETIC_CLASSES), made.train_texts,
                           made.train_labels,
                           source="robustkit_text.synthetic (generated reviews, seed 0)")
    else:
        path, columns = parse_ref(ref)
        if not path.exists():
            raise DataError(f"data {ref!r} does not exist")
        if path.is_dir():
            data = _load_folder(path, columns)
        else:
            texts, labels, lines = _read(path, columns)
            data = TextDataset(path.stem, texts, labels, max(labels) + 1, source=str(path), columns=columns,
                               lines=lines)
    if limit is not None:
        data.texts, data.labels, data.lines = data.texts[:limit], data.labels[:limit], data.lines[:limit]
        data.train_texts = data.train_labels = None
        data.train_lines = []
    return data


def check_label_range(data: TextDataset, classes: int) -> None:
    """A ``DataError`` naming the first sample whose label is no class of a model with ``classes``
    outputs (labels are class indices 0..classes-1)."""
    for labels, lines in ((data.labels, data.lines), (data.train_labels or [], data.train_lines)):
        for index, label in enumerate(labels):
            if label >= classes:
                where = lines[index] if index < len(lines) else f"{data.source or data.name} sample {index + 1}"
                raise DataError(f"{where}: label {label} is out of range: the model has {classes} outputs (classes "
                                f"0..{classes - 1}) but the data has {data.num_classes} classes; give data with the "
                                "model's classes, or a model with as many outputs as the data has classes")


def _load_folder(path: Path, columns: Columns) -> TextDataset:
    def find(names: tuple[str, ...]) -> Path | None:
        return next((path / f"{n}{s}" for n in names for s in SUFFIXES if (path / f"{n}{s}").is_file()), None)

    train, evaluation = find(("train",)), find(EVAL_NAMES)
    if evaluation is None:
        raise DataError(f"{path}: a text data folder needs test.csv/.jsonl (or val) for the evaluation, "
                        "and train.csv/.jsonl for training")
    texts, labels, lines = _read(evaluation, columns)
    train_texts, train_labels, train_lines = _read(train, columns) if train is not None else (None, None, [])
    classes = max(labels + (train_labels or [])) + 1
    return TextDataset(path.name, texts, labels, classes, train_texts, train_labels, str(path), columns,
                       lines, train_lines)


def read_file(path: Path, columns: Columns) -> tuple[list[str], list[int]]:
    """Texts and labels of one CSV or JSONL file; a ``DataError`` naming the line and the fix."""
    texts, labels, _ = _read(path, columns)
    return texts, labels


def _read(path: Path, columns: Columns) -> tuple[list[str], list[int], list[str]]:
    """``read_file``, with where each sample comes from ("FILE line N")."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported text data file; give a .csv or .jsonl with text and label columns")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    # A text costs more in memory than on disk (Python strings, then token ids): 8x the file.
    message = over_limit(f"{path} ({path.stat().st_size} bytes on disk)", 8 * path.stat().st_size)
    if message:
        raise DataError(message)
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    if not content.strip():
        raise DataError(f"{path}: empty file; give one sample per row with {columns.text!r} and {columns.label!r}")
    rows = _csv_rows(path, content) if suffix == ".csv" else _jsonl_rows(path, content)
    texts, labels, lines = [], [], []
    for line, row in rows:
        missing = [c for c in (columns.text, columns.label) if c not in row]
        if missing:
            found = ", ".join(map(str, row)) or "none"
            raise DataError(f"{path} line {line}: no column {missing[0]!r} (columns found: {found}); name the "
                            f"columns as {path.name}?text=COLUMN&label=COLUMN")
        text, label = row[columns.text], row[columns.label]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {line}: the text is empty or not a string; drop the row or fill it")
        texts.append(text)
        labels.append(_label(label, path, line))
        lines.append(f"{path} line {line}")
    if not texts:
        raise DataError(f"{path}: a header but no samples")
    return texts, labels, lines


#: A label as text: an optional minus sign and ASCII digits, nothing else (``--1``, ``²``, ``1_0``,
#: other scripts' digits and ``1.0`` are not class indices).
_INTEGER = re.compile(r"-?[0-9]+")


def _label(value: Any, path: Path, line: int) -> int:
    if isinstance(value, (bool, float)):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        number = None
    if number is None:
        raise DataError(f"{path} line {line}: label {value!r} is not an integer class index; map the labels to 0..C-1")
    if number < 0:
        raise DataError(f"{path} line {line}: label {number} is negative; labels are class indices 0..C-1")
    return number


def _csv_rows(path: Path, content: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():  # csv.DictReader's restkey / restval: cells != columns
                columns = len(reader.fieldnames or ())
                cells = columns + len(row.get(None) or ()) - list(row.values()).count(None)
                fix = ("quote a text that holds commas (\"a, b\")" if cells > columns
                       else "fill the missing cells or drop the row")
                raise DataError(f"{path} line {reader.line_num}: {cells} cell{'s' * (cells != 1)} but the header "
                                f"names {columns} columns; {fix}")
            rows.append((reader.line_num, dict(row)))
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    if not reader.fieldnames:
        raise DataError(f"{path}: no header row; the first row names the columns (text,label)")
    return rows


def _jsonl_rows(path: Path, content: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # lines end at \n only: str.splitlines() also splits at U+2028 and other characters that JSON
    # strings may hold raw (a \r before the \n is JSON whitespace)
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path} line {number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected an object such as {{\"text\": ..., \"label\": 0}}")
        rows.append((number, row))
    return rows
