"""Progress bars with rate and ETA for the long phases of a run, on process 0 only.

``mode`` is 'auto' (bars when stderr is a terminal: quiet in non-interactive logs, which get the
run's own periodic lines instead), 'always' or 'never'. Console lines written through `say`
keep an active bar at the bottom of the terminal instead of breaking it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

PROGRESS_MODES = ("auto", "always", "never")
T = TypeVar("T")


def bars_enabled(mode: str, is_main: bool) -> bool:
    if mode not in PROGRESS_MODES:
        raise ValueError(f"log.progress must be one of {PROGRESS_MODES}, got {mode!r}")
    return is_main and (mode == "always" or (mode == "auto" and sys.stderr.isatty()))


def progress(
    items: Iterable[T], total: int | None, description: str, enabled: bool, unit: str = "batch"
) -> Iterator[T]:
    """``items`` unchanged, with a bar ``description: n/total [elapsed<eta, rate]`` when enabled."""
    if not enabled:
        yield from items
        return
    with tqdm(items, total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield from bar


def say(line: str) -> None:
    """Print a console line on stderr above any active bar."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
