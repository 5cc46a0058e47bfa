"""transformers kept quiet while robustkit loads through it, and what matters said in robustkit's words.

transformers logs to stderr and draws progress bars of its own; robustkit's output is robustkit's
(results on stdout, its own log on stderr). Inside ``quiet_transformers`` its log records and bars
are held back; a warning that changes what the numbers mean (weights the checkpoint lacked,
initialised at random: an untrained classifier) becomes a robustkit note and a robustkit warning,
and every other warning goes to robustkit's debug log (``robustkit -v``).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from robustkit.models.base import LoadedModel, LoadOptions
from robustkit.models.loading import load_model

log = logging.getLogger(__name__)

#: transformers' library root logger: every ``transformers.*`` logger hands its records to it
LIBRARY_LOGGER = "transformers"


class _Heard(logging.Handler):
    """Turns the warnings of transformers into robustkit notes (``notes``) as they are logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        note = untrained_note(message)
        if note is None:
            log.debug("transformers: %s", message)
        elif note not in self.notes:
            log.warning("%s", note)
            self.notes.append(note)


def untrained_note(message: str) -> str | None:
    """robustkit's note for transformers' "newly initialized" warning (weights missing from the
    checkpoint, or of other shapes, drawn at random), else None."""
    if "newly initialized" not in message:
        return None
    listed = message.partition("newly initialized")[2]
    names = re.findall(r"'([^']+)'", listed.splitlines()[0]) or re.findall(r"^- ([^:]+): found shape", listed, re.M)
    return (f"the checkpoint lacks {', '.join(names) or 'some weights'} (or holds them in other shapes): "
            "transformers initialised them at random, so the model is (partly) untrained; fine-tune it "
            "before reading its accuracies (robustkit harden)")


@contextmanager
def quiet_transformers() -> Iterator[list[str]]:
    """Hold back transformers' log records and progress bars in the block; yields the notes its
    warnings became (filled as they are logged). The logger and bars are restored afterwards."""
    from transformers.utils import logging as hf_logging

    library = hf_logging.get_logger(LIBRARY_LOGGER)  # configured: transformers' own handler attached
    handlers, level, propagate = library.handlers[:], library.level, library.propagate
    bars = hf_logging.is_progress_bar_enabled()
    heard = _Heard()
    library.handlers = [heard]
    library.propagate = False
    library.setLevel(min(library.getEffectiveLevel(), logging.WARNING))  # heard even under TRANSFORMERS_VERBOSITY=error
    hf_logging.disable_progress_bar()
    try:
        yield heard.notes
    finally:
        library.handlers, library.propagate = handlers, propagate
        library.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_quietly(ref: str, options: LoadOptions) -> tuple[LoadedModel, list[str]]:
    """``load_model`` inside ``quiet_transformers``: the model, with what transformers warned of
    in its notes, and those warnings again (a job puts them in its report's notes, as banners)."""
    with quiet_transformers() as heard:
        loaded = load_model(ref, options)
    loaded.notes.extend(heard)
    return loaded, heard
