"""The text threat model: a budget of k edits, the text analogue of eps.

An edit is one token substitution (HotFlip, the random baseline), optionally restricted to a
user's substitution list (JSON: word -> allowed replacements), or one character operation
(swap two neighbouring characters, delete one, insert one, substitute a neighbouring key).
Edits are counted on the result, never taken from the attack's word: token edits are the
positions whose id changed, character edits the optimal-string-alignment distance between
the texts (``osa_distance``).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustkit.errors import OptionError, RobustkitError

log = logging.getLogger(__name__)

CHAR_OPS = ("swap", "delete", "insert", "substitute")
DEFAULT_BUDGETS = (1, 2, 3)
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
#: Each letter's neighbours on a QWERTY keyboard (same row and the rows above and below).
KEY_NEIGHBOURS = {
    key: "".join(
        _ROWS[r][c] for r in range(max(0, row - 1), min(len(_ROWS), row + 2))
        for c in range(max(0, col - 1), min(len(_ROWS[r]), col + 2)) if (r, c) != (row, col)
    )
    for row, line in enumerate(_ROWS) for col, key in enumerate(line)
}


@dataclass(frozen=True)
class TextThreat:
    budgets: tuple[int, ...] = DEFAULT_BUDGETS  #: the edit budgets k at which robust accuracy is reported
    char_ops: tuple[str, ...] = CHAR_OPS
    substitutions: str | None = None  #: path of the substitution list; None: any vocabulary token

    def describe(self, substitution_words: int | None = None) -> dict[str, Any]:
        return {
            "edits": "a budget of k edits per text; an attack's edits are of one kind",
            "budgets": list(self.budgets),
            "token_substitution": ("any vocabulary token (no substitution list)" if self.substitutions is None
                                   else f"only the replacements in {self.substitutions} "
                                        f"({substitution_words} words have some)"),
            "character_operations": list(self.char_ops),
        }


def parse_budgets(values: tuple[float, ...]) -> tuple[int, ...]:
    """``--eps 1,2,3`` for text: whole numbers of edits, at least 1, sorted."""
    if not values:
        return DEFAULT_BUDGETS
    if any(v != int(v) or v < 1 for v in values):
        raise OptionError(f"--eps for text is the edit budget k: whole numbers >= 1, e.g. --eps 1,2,3 (got "
                          f"{','.join(f'{v:g}' for v in values)})")
    return tuple(sorted({int(v) for v in values}))


def parse_char_ops(text: str) -> tuple[str, ...]:
    ops = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [op for op in ops if op not in CHAR_OPS]
    if unknown or not ops:
        raise OptionError(f"char_ops {text!r}: use a comma-separated list of {', '.join(CHAR_OPS)}")
    return ops


def load_substitutions(path: str) -> dict[str, list[str]]:
    """The substitution list: a JSON object of word -> list of allowed replacement words."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RobustkitError(f"substitution list {path} does not exist")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RobustkitError(f"substitution list {path}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(w, str) for w in v) for k, v in document.items()
    ):
        raise RobustkitError(f'substitution list {path}: expected an object of word -> list of words, e.g. '
                             '{"good": ["fine", "nice"]}')
    return document


def allowed_matrix(substitutions: dict[str, list[str]], vocab: dict[str, int], size: int) -> tuple[Tensor, int]:
    """(V x V bool: may token i become token j, words of the list that are single tokens).

    Words are looked up as the tokenizer's vocabulary spells them (lower-cased when the exact
    spelling is absent); pairs with a side that is no single token are left out."""

    def token(word: str) -> int | None:
        return vocab.get(word, vocab.get(word.lower()))

    allowed = torch.zeros(size, size, dtype=torch.bool)
    words = 0
    missing: list[str] = []  # words of the list that are no single token, in the order met
    for word, replacements in substitutions.items():
        source = token(word)
        targets = [t for t in map(token, replacements) if t is not None and t != source]
        missing += [w for w in (word, *replacements) if token(w) is None]
        if source is not None and targets:
            allowed[source, targets] = True
            words += 1
    entries = len(substitutions)
    example = (f"e.g. {missing[0]!r} is not in the vocabulary" if missing
               else "each maps only onto itself" if entries else "the list is empty")
    if not words:
        raise OptionError(f"-o substitutions: none of the list's {entries} words is usable ({example}); a word and "
                          "its replacements must each be a single token of the model's vocabulary")
    if words < entries / 2:
        log.warning("-o substitutions: only %d of the list's %d words are usable (%s); the others are not "
                    "attacked", words, entries, example)
    return allowed, words


def token_edits(original: Tensor, adversarial: Tensor) -> Tensor:
    """Token substitutions per row: positions whose id differs."""
    return (original.long() != adversarial.long()).sum(dim=1)


def osa_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap of neighbours) from ``a`` to ``b``: the optimal
    string alignment distance, what the character attack is charged."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def char_variants(word: str, ops: tuple[str, ...], rng: random.Random, per_op: int = 2) -> list[str]:
    """Up to ``per_op`` one-edit variants of ``word`` per operation, at random positions."""
    variants: list[str] = []
    for op in ops:
        for _ in range(per_op):
            j = rng.randrange(len(word))
            if op == "swap" and len(word) >= 2:
                j = min(j, len(word) - 2)
                if word[j] != word[j + 1]:
                    variants.append(word[:j] + word[j + 1] + word[j] + word[j + 2:])
            elif op == "delete" and len(word) >= 2:
                variants.append(word[:j] + word[j + 1:])
            elif op == "insert":
                variants.append(word[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[j:])
            elif op == "substitute" and word[j].lower() in KEY_NEIGHBOURS:
                key = rng.choice(KEY_NEIGHBOURS[word[j].lower()])
                variants.append(word[:j] + (key.upper() if word[j].isupper() else key) + word[j + 1:])
    return list(dict.fromkeys(v for v in variants if v != word))
