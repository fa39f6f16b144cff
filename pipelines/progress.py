"""Progress of a build: a counter actor fed by the tasks, and the bar the driver draws from it.

Kept apart from the pipeline modules on purpose: the counter runs in its own Ray actor process, and
importing it must not pull in OpenCV, pymatting (numba) or torch there.
"""

from __future__ import annotations

import time


class BuildCounter:
    """Pairs and rejects so far, reported by tasks after every batch (for the progress bar)."""

    def __init__(self) -> None:
        self.pairs = 0
        self.rejects = 0

    def add(self, pairs: int, rejects: int) -> None:
        self.pairs += pairs
        self.rejects += rejects

    def totals(self) -> tuple[int, int]:
        return self.pairs, self.rejects


class BuildProgress:
    """A rich progress bar of candidates done (pairs + rejects), with pairs/s and ETA."""

    def __init__(self, total: int, done_before: tuple[int, int], enabled: bool) -> None:
        self.total = total
        self.base_pairs, self.base_rejects = done_before
        self.enabled = enabled
        self.started = time.perf_counter()

    def __enter__(self) -> "BuildProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("build"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("build", total=self.total, rate="",
                                          completed=self.base_pairs + self.base_rejects)
        return self

    def update(self, pairs: int, rejects: int) -> None:
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, completed=self.base_pairs + self.base_rejects + pairs + rejects,
                        rate=f"{pairs / elapsed:.1f} pairs/s, {self.base_rejects + rejects} rejects")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
