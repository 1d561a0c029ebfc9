"""The tokenizer stages' command lines, built by :mod:`sidrank.cli` from their config dataclasses.

Every option is a field of the stage's config: help from its docstring,
default from the field, ``--config FILE`` replaying a run's saved options.
The ``__main__`` of each stage wraps :func:`stage_main` in
:func:`sidrank.cli.run_main`, so bad input ends in one clean line.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sidrank.cli import add_config_arguments, parse_config, parser_for
from tokenizer.settings import Settings

C = TypeVar("C")


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """One ``--flag`` per field of ``cls``: its own fields first, then each setting group it
    inherits as an argument group (help texts from the class that declares the field)."""
    groups = [base for base in cls.__bases__ if issubclass(base, Settings)]
    add_config_arguments(parser, cls, skip=tuple(name for group in groups for name in group.names()))
    for group in groups:
        title = (group.__doc__ or group.__name__).splitlines()[0].rstrip(".")
        add_config_arguments(parser.add_argument_group(title), group)  # type: ignore[arg-type]


def stage_main(
    prog: str,
    description: str,
    cls: type[C],
    stage: Callable[[C], Any],
    argv: list[str] | None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser, type], None] = add_config_arguments,
) -> Any:
    """Parse ``argv`` into a ``cls`` config named ``prog`` and run ``stage`` on it, logging to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = parser_for(prog, description)
    add_arguments(parser, cls)
    return stage(parse_config(parser, cls, argv))
