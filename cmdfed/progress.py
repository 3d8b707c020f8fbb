"""Progress reporting that the library can call without knowing who is watching.

Library functions take ``progress: Progress | None``; the CLI passes one backed by a rich
progress bar, a Flower client could pass one that logs, tests pass none.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int | None, what: str) -> None:
        """``done`` of ``total`` units of ``what`` finished so far (``total`` None if unknown)."""


def report(progress: Progress | None, done: int, total: int | None, what: str) -> None:
    if progress is not None:
        progress(done, total, what)
