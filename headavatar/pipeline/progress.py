"""One progress display across the stages of `make` (and over the subjects of `batch`).

The library functions the stages call have bars of their own; the pipeline turns those off and
shows a single bar instead, filled by a small thread that asks the running stage how far it is
(a *probe*: it reads what the stage has written so far, e.g. the training curve), so nothing in
the stages needs a callback.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

Probe = Callable[[], "tuple[float, str]"]  # -> (fraction of the stage done in [0, 1], short text)


class ProgressDisplay:
    """A bar over ``total`` units (stages, or subject-stages); ``enabled=False`` prints plain lines only."""

    def __init__(self, total: float, desc: str, enabled: bool = True, unit: str = "stage", interval: float = 0.5):
        self.enabled = enabled
        self.interval = interval
        self.done = 0.0
        self._probe: Probe | None = None
        self._absolute = False
        self._label = ""
        self._t_stage = time.perf_counter()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                             bar_format="{desc} |{bar}| {n:.1f}/{total:.0f} " + unit + "s [{elapsed}]{postfix}")
            self._thread = threading.Thread(target=self._poll, name="headavatar-progress", daemon=True)
            self._thread.start()

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly when there is none)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def begin(self, label: str, probe: Probe | None = None, absolute: bool = False) -> None:
        """A new stage; ``probe`` says how far it is (``absolute``: it returns the units done in all)."""
        with self._lock:
            self._label, self._probe, self._t_stage, self._absolute = label, probe, time.perf_counter(), absolute
        self._show(0.0, "")

    def end(self, units: float = 1.0) -> None:
        with self._lock:
            self.done += units
            self._probe = None
        self._show(0.0, "")

    def set_done(self, done: float, label: str = "") -> None:
        """For displays fed from outside (batch): the number of units finished so far."""
        with self._lock:
            self.done = done
            if label:
                self._label = label
        self._show(0.0, "")

    def _show(self, frac: float, text: str) -> None:
        if self._bar is None:
            return
        with self._lock:
            self._bar.n = min(self._bar.total, self.done + max(0.0, min(1.0, frac)))
            dt = time.perf_counter() - self._t_stage
            post = f"{self._label} {dt:.0f}s" + (f" · {text}" if text else "") if self._label else text
            self._bar.set_postfix_str(post, refresh=False)
            self._bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            probe = self._probe
            try:
                frac, text = probe() if probe else (0.0, "")
            except Exception:  # a probe reads files being written: a bad read only costs one update
                frac, text = 0.0, ""
            if self._absolute:
                self.done, frac = frac, 0.0
            self._show(frac, text)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._bar is not None:
            self._show(0.0, "")
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressDisplay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
