"""What a run writes down: config.json, metrics.jsonl, stage_report.json, console lines.

Only process 0 writes or prints. ``metrics.jsonl`` holds one JSON object per logged step with
``split`` ("train" or "eval"), ``stage`` and ``step``; on resume the rows past the restored
position are dropped first, so the file reads as if the run had never stopped. Trackers
(TensorBoard, W&B; see sdpo_jax.tracking) get the same rows at the run-wide step.

One console channel: while ``library_messages()`` is open, what the library's own modules log
(the ``sdpo_jax`` loggers: the data loader's truncation and drop counts, the reward model's
warnings) comes out as the run's console lines, whatever level absl or the user set on Python's
root logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdpo_jax.errors import SdpoError
from sdpo_jax.progress import say


class RunLog:
    def __init__(self, output_dir: str | Path, is_main: bool = True):
        self.dir = Path(output_dir)
        self.is_main = is_main
        self.metrics_path = self.dir / "metrics.jsonl"
        self.report_path = self.dir / "stage_report.json"
        self._started = time.perf_counter()
        self.trackers: list[Any] = []

    def info(self, message: str) -> None:
        if self.is_main:
            say(f"[sdpo {time.perf_counter() - self._started:7.1f}s] {message}")

    @contextlib.contextmanager
    def library_messages(self) -> Iterator[None]:
        """Route the ``sdpo_jax`` loggers' INFO and above to ``info`` (warnings prefixed) until closed."""
        library = logging.getLogger("sdpo_jax")
        handler = _ConsoleHandler(self)
        saved = library.level, library.propagate
        library.addHandler(handler)
        library.setLevel(logging.INFO)
        library.propagate = False
        try:
            yield
        finally:
            library.removeHandler(handler)
            library.setLevel(saved[0])
            library.propagate = saved[1]

    def metrics(self, row: dict[str, Any], global_step: int) -> None:
        """Append ``row`` to metrics.jsonl and send it to the trackers at run-wide ``global_step``."""
        if self.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            for tracker in self.trackers:
                tracker.write(row, global_step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def read_metrics(self) -> list[dict]:
        return read_json_lines(self.metrics_path)

    def rewind_metrics(self, stage: int, step: int) -> None:
        """Keep only the rows a run restored at (stage, step) had written: those before it, and at a
        mid-stage step > 0 that step's own train row and the stage's 'before' eval (at step 0)."""
        if not self.is_main:
            return
        kept = []
        for row in self.read_metrics():
            position = (row["stage"], row["step"])
            if position < (stage, step) or (position == (stage, step) and step > 0 and row.get("when") != "after"):
                kept.append(json.dumps(row) + "\n")
        self.metrics_path.write_text("".join(kept), encoding="utf-8")

    def read_report(self) -> list[dict]:
        return read_json(self.report_path, {"stages": []})["stages"]

    def write_report(self, stages: list[dict]) -> None:
        if self.is_main:
            tmp = self.report_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"stages": stages}, indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.report_path)

    def write_json(self, name: str, value: Any) -> None:
        if self.is_main:
            (self.dir / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON value of a run's file, ``default`` when there is none; one that does not parse is a
    one-line `SdpoError` naming the file, line and column."""
    if not path.exists():
        return default
    return _parse(path, path.read_text(encoding="utf-8"))


def read_json_lines(path: Path) -> list:
    """The values of a run's JSON-lines file (blank lines skipped), [] when there is none. A last line
    without its newline is a row still being written, or cut short by a kill: it is left out. Any
    other line that does not parse is a one-line `SdpoError` naming the file and line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    return [_parse(path, line, number) for number, line in enumerate(lines, start=1) if line.strip()]


def _parse(path: Path, text: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line if line is not None else err.lineno}, column {err.colno}"
        raise SdpoError(f"{path}: {where}: not valid JSON ({err.msg}); the run's file was damaged or edited") from None


class _ConsoleHandler(logging.Handler):
    def __init__(self, log: RunLog):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.log.info(f"warning: {message}" if record.levelno >= logging.WARNING else message)
