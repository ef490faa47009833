"""What a run tells people: readable lines on stdout, progress bars, and TensorBoard scalars (written and read back).

* :func:`log` -- the one way library code prints: process 0 only, and above a progress bar if one is showing.
* :class:`Progress` -- a bar on a terminal, otherwise a line per update (or nothing, for the training loop, whose
  periodic log lines say the same); it records when each update came, for rates that leave out the first compile.
* :func:`metric_writer` -- TensorBoard scalars in event files on process 0, written without TensorFlow.
* :func:`read_metrics` -- a run's scalars back as arrays, through TensorBoard's own event-file reader.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import jax
import numpy as np

from jaxdiff.errors import MissingFileError

__all__ = [
    "NoWriter",
    "Progress",
    "ScalarWriter",
    "is_main_process",
    "log",
    "metric_writer",
    "read_metrics",
    "show_all",
]

#: Set to a value other than "" and "0" (``--verbose`` does): jaxdiff's own quieting hides nothing either.
VERBOSE_ENV = "JAXDIFF_VERBOSE"


def show_all() -> bool:
    """Whether the console should show every library's messages (``$JAXDIFF_VERBOSE``; ``--verbose`` sets it)."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def is_main_process() -> bool:
    """Whether this is process 0, the one that logs and writes files for all."""
    return jax.process_index() == 0


def log(line: str) -> None:
    """Print ``line`` on process 0 (through tqdm, so that a progress bar on screen is redrawn below it)."""
    if not is_main_process():
        return
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class Progress:
    """Progress over ``total`` units: a tqdm bar on a terminal (process 0); elsewhere a line per update if ``lines``.

    Call it with the number of units just done. ``times`` holds when each update came (``time.perf_counter()``).
    """

    def __init__(self, total: int, unit: str, *, initial: int = 0, lines: bool = True):
        self.total, self.unit, self.done, self.lines = total, unit, initial, lines
        self.times: list[float] = []
        self.bar = None
        if is_main_process() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        self.times.append(time.perf_counter())
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            log(f"  {self.done}/{self.total} {self.unit}s")

    def rate_after_first(self, per_update: int) -> float | None:
        """Units per second after the first update (which includes the compile); None with one update or fewer."""
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) * per_update / (self.times[-1] - self.times[0])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ScalarWriter:
    """TensorBoard scalars in an event file under ``logdir``: ``Event`` protos in TFRecord framing, as TensorBoard's
    own writer and clu's write them, without importing TensorFlow (~3.5 s of a process's start; TensorBoard's writer
    imports it when it is installed). Each call is flushed at once, so a run killed later keeps what it logged."""

    def __init__(self, logdir: str | os.PathLike):
        import socket

        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0"
        self._records = RecordWriter(open(pathlib.Path(logdir) / name, "wb"))  # closed by close()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        self._records.flush()

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
        self._write(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def close(self) -> None:
        self._records.close()


class NoWriter:
    """What processes other than 0 write: nothing."""

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        del step, scalars

    def close(self) -> None:
        pass


def metric_writer(workdir: str | os.PathLike) -> ScalarWriter | NoWriter:
    """TensorBoard scalars under ``workdir/tensorboard`` on process 0 (the others write none)."""
    if not is_main_process():
        return NoWriter()
    return ScalarWriter(pathlib.Path(workdir) / "tensorboard")


def read_metrics(workdir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scalars a run logged to ``workdir/tensorboard``, as ``{name: (steps int64 [n], values float64 [n])}``.

    Sorted by step. The event files of a run resumed several times are read in the order they were created (the
    timestamp in their names, which survives copying), and a step logged twice keeps its latest value. For plotting a
    run in a notebook without TensorBoard.

    Raises:
      FileNotFoundError: ``workdir`` holds no TensorBoard logs.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    folder = pathlib.Path(workdir, "tensorboard")
    files = sorted(folder.glob("events.out.tfevents.*"), key=lambda p: (_created(p), p.name))
    if not files:
        raise MissingFileError(f"No TensorBoard logs in {folder}: is {workdir} a run?")
    logged: dict[str, dict[int, float]] = {}
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                scalar = make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                logged.setdefault(value.tag, {})[int(event.step)] = float(scalar)
    return {
        tag: (np.array(sorted(by_step), np.int64), np.array([by_step[s] for s in sorted(by_step)], np.float64))
        for tag, by_step in logged.items()
    }


def _created(path: pathlib.Path) -> float:
    """The creation time in an event file's name (``events.out.tfevents.<seconds>.<host>...``)."""
    try:
        return float(path.name.split(".")[3])
    except (IndexError, ValueError):
        return float("inf")
