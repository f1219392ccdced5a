"""Times looplift's check of label inputs against their vocabulary (``looplift.program._check_labels``): the
seconds spent in it while a benchmark runs, to report its share of the step time."""

from __future__ import annotations

import time

import looplift.program as _program


class LabelCheckTimer:
    """While active (``with LabelCheckTimer() as t:``), ``t.seconds`` sums the time of every label check and
    ``t.calls`` counts them."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._original = _program._check_labels

    def __enter__(self) -> LabelCheckTimer:
        original = self._original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        _program._check_labels = timed
        return self

    def __exit__(self, *exc) -> None:
        _program._check_labels = self._original
