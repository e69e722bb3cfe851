"""Stop strings: cut the text at the stop string that completes first, whole or as it streams."""

from __future__ import annotations

from collections.abc import Sequence


def _first_stop(text: str, stops: Sequence[str], start: int = 0, include: bool = False) -> int | None:
    """Where the output is cut: before the stop string that ends first, or after it with `include`."""
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s, start)) >= 0]
    return None if not hits else min(hits)[0 if include else 1]


def trim_stop(text: str, stops: Sequence[str], include: bool = False) -> str:
    """The text OpenAI returns for the whole output `text` (non-streaming)."""
    cut = _first_stop(text, stops, include=include)
    return text if cut is None else text[:cut]


class StopTrimmer:
    """Streaming stop strings: `push(delta)` returns only text that can no longer turn into a stop
    string; a suffix that could be one's start is held back until disambiguated or `flush()`ed.

        text:  |--- emitted ---|-- held: a prefix of some stop --|
                               ^ every stop occurrence starts here or later
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._include = include  # the stop string itself is emitted (include_stop_str_in_output)
        self._text = ""
        self._num_emitted = 0  # chars of _text already returned
        self.stopped = False  # a stop string was seen; everything after it is dropped

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._text += delta
        cut = _first_stop(self._text, self._stops, self._num_emitted, self._include)
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self._text) - self._held_len())

    def flush(self) -> str:
        """At the end of generation: the held-back text was not a stop string after all."""
        return "" if self.stopped else self._emit(len(self._text))

    def _held_len(self) -> int:
        longest = max((len(s) for s in self._stops), default=1)
        for k in range(min(longest - 1, len(self._text) - self._num_emitted), 0, -1):
            if any(s.startswith(self._text[-k:]) for s in self._stops):
                return k
        return 0

    def _emit(self, end: int) -> str:
        piece = self._text[self._num_emitted:end]
        self._num_emitted = end
        return piece
