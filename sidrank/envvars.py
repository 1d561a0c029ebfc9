"""Temporary environment variables for a block of code (benchmarks point Feast at a store through them)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def env_override(values: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``values`` inside the block (None unsets), restored after, also on an error.

    Child processes started inside the block inherit it. A variable the block
    itself changes is restored too: afterwards each named variable is set
    as before the block, or unset if it was unset then.
    """
    saved = {key: os.environ.get(key) for key in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
