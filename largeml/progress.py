"""A progress line for long loops (training, evaluation, conversion), readable on a terminal and
in a log."""

import logging
import math
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Progress of a loop on rank 0: on a terminal, one status line redrawn in place; elsewhere
    (CI logs, files) a plain log line at most every `every` seconds, and one at the end. Both
    read `[label ]step N/T (P%), R samples/s, ETA hh:mm:ss` (`unit` names what N counts)."""

    def __init__(self, total: float, enabled: bool = True, every: float = 30.0,
                 unit: str = "step", label: str = "") -> None:
        self.total, self.enabled, self.every, self.unit = total, enabled, every, unit
        self.prefix = f"{label} " if label else ""
        self.terminal = False
        self.last_line = -math.inf
        self.started = time.perf_counter()
        self.first_step = 0
        self.ended = False

    def start(self, step: float) -> None:
        self.terminal = self.enabled and sys.stderr.isatty()
        # The first line comes with the first step: a log shows at once that training runs.
        self.started, self.first_step, self.last_line = time.perf_counter(), step, -math.inf
        self.ended = False

    def update(self, step: float, rate: float | None = None) -> None:
        """`step` of `total` done, at `rate` samples per second when known."""
        if not self.enabled:
            return
        interval = 0.2 if self.terminal else self.every
        if self.ended or time.monotonic() - self.last_line < interval and step < self.total:
            return
        self.ended = step >= self.total  # one line at the end, however often it is reported
        self.last_line = time.monotonic()
        done = step - self.first_step
        eta = "--:--:--" if done <= 0 else time.strftime("%H:%M:%S", time.gmtime(
            (time.perf_counter() - self.started) / done * (self.total - step)))
        line = (f"{self.prefix}{self.unit} {_amount(step)}/{_amount(self.total)} "
                f"({math.floor(100 * step / max(self.total, 1e-12))}%), "
                f"{'-' if rate is None else f'{rate:,.0f}'} samples/s, "
                f"ETA {eta}")
        if self.terminal:
            sys.stderr.write(f"\r{line}\x1b[K")  # \x1b[K: clear the rest of the line
            sys.stderr.flush()
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self.terminal:
            sys.stderr.write("\r\x1b[K")  # the log lines stay, the status line goes
            sys.stderr.flush()
            self.terminal = False


def _amount(n: float) -> str:
    """Whole counts as they are, fractional ones (MiB read) to one decimal."""
    return f"{n:,.1f}" if isinstance(n, float) else str(n)


class Throughput:
    """The training figures of one logging window: rows, steps, the time spent waiting for
    batches, and the wall time less what `pause()` excluded (validation, checkpoints)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows = self.steps = 0
        self.waited = self.paused = 0.0
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return max(time.perf_counter() - self.started - self.paused, 1e-9)

    def figures(self, rows: float) -> dict[str, float]:
        """Throughput of `rows` (this window's rows over all processes), step time, data wait."""
        seconds = self.seconds()
        return {
            "perf/samples_per_sec": rows / seconds,
            "perf/step_time_ms": 1000 * seconds / max(self.steps, 1),
            "perf/data_wait_fraction": min(1.0, self.waited / seconds),
        }
