"""Command lines from config dataclasses: one place sets each default and each help text.

Every stage's config is a dataclass whose Google-style ``Args:`` docstring
documents its fields. :func:`add_config_arguments` turns the fields into
``--flags`` (help from the docstring, default from the field, shown by
``--help``), nested config dataclasses included; :func:`parse_config`
builds the validated config back, and ``--config FILE`` replays the
``config`` block a run saved in its metrics.json, explicit flags winning.
:func:`run_main` gives a user one clean line for bad input instead of a
traceback, printed once however many ranks hit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sidrank.schema import DataError

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """``name -> text`` of the ``Args:`` section of a dataclass docstring (continuation lines joined)."""
    docs: dict[str, str] = {}
    match = re.search(r"\n\s*Args:\n(.*?)(\n\s*\n|\Z)", cls.__doc__ or "", re.S)
    if not match:
        return docs
    current = None
    for line in match.group(1).splitlines():
        entry = re.match(r"\s+(\w+)(?: \([^)]*\))?: (.*)", line)
        if entry and entry.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _scalar_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None member of ``X | None``, whether None was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _nested(cls: type) -> dict[str, type]:
    """Field -> config dataclass of the fields that hold one (``X`` or ``X | None``)."""
    hints = typing.get_type_hints(cls)
    nested = {}
    for f in dataclasses.fields(cls):
        kind, _ = _scalar_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            nested[f.name] = kind
    return nested


def _flag_names(cls: type) -> set[str]:
    """Every field name ``cls`` turns into a flag, those of nested configs included."""
    nested = _nested(cls)
    names = set()
    for f in dataclasses.fields(cls):
        names |= _flag_names(nested[f.name]) if f.name in nested else {f.name}
    return names


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per field of ``cls`` (and of its nested config dataclasses), minus ``skip``.

    The flag is ``--<field-name>`` unless field metadata ``flag`` names it;
    metadata ``choices`` restricts a value; a field without a default, or
    named in ``required`` (a field only some commands need), is a required
    flag; ``bool`` fields get ``--x/--no-x``; tuples take several values;
    ``Path`` and ``X | None`` fields parse as their type.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    nested = _nested(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in nested:
            add_config_arguments(parser, nested[f.name], skip=skip, required=required)
            continue
        kind, _ = _scalar_type(hints[f.name])
        default = _default(f)
        # argparse %-formats help texts, so a literal "20%" in a docstring must be doubled.
        text = docs.get(f.name, " ").replace("``", "").replace("%", "%%")
        options: dict[str, Any] = {"help": text, "dest": f.name}
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if "flag" in f.metadata and kind is not bool:
            options["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        if default is dataclasses.MISSING or f.name in required:
            # SUPPRESS keeps "(default: None)" out of the help of a flag that has none.
            options.update(required=True, default=argparse.SUPPRESS)
        else:
            options["default"] = default
        if "choices" in f.metadata:
            options["choices"] = list(f.metadata["choices"])
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        elif typing.get_origin(kind) is list:
            options.update(nargs="*", type=typing.get_args(kind)[0])
        else:
            options["type"] = kind
        parser.add_argument(flag, **options)


def build_config(cls: type[T], values: dict[str, Any]) -> T:
    """``cls`` from a flat ``field -> value`` dict (nested configs take their own fields); validates.

    An ``X | None`` config none of whose fields is in ``values`` (a command
    that does not offer its flags) keeps its default.
    """
    hints = typing.get_type_hints(cls)
    nested = _nested(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in nested:
            optional = _scalar_type(hints[f.name])[1]
            if not optional or _flag_names(nested[f.name]) & set(values):
                kwargs[f.name] = build_config(nested[f.name], values)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) and isinstance(_default(f), tuple) else value
    return cls(**kwargs)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        flat.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return flat


def saved_config(path: Path) -> dict[str, Any]:
    """The flat ``config`` block of a metrics.json (or a bare config JSON) for ``--config``."""
    if not path.exists():
        raise DataError(f"{path}: --config file not found; pass a run's metrics.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); pass a run's metrics.json") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object with a 'config' block")
    return _flatten(raw.get("config", raw))


def parser_for(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser that names itself ``python -m ...``, shows defaults and rejects abbreviations."""
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def parse_config(parser: argparse.ArgumentParser, cls: type[T], argv: list[str] | None) -> T:
    """Parse ``argv`` into ``cls``; ``--config FILE`` replays a saved config, explicit flags win.

    Keys of the saved config that are not options of ``parser`` are an error naming them.
    """
    help_text = "replay the 'config' block of a run's metrics.json; flags given beside it win"
    parser.add_argument("--config", type=Path, default=None, help=help_text)
    # Its own parser: the full one would demand the required flags that the saved config supplies.
    replay = argparse.ArgumentParser(add_help=False)
    replay.add_argument("--config", type=Path, default=None)
    first, _ = replay.parse_known_args(argv)
    if first.config is not None:
        saved = saved_config(first.config)
        known = {a.dest for a in parser._actions}  # argparse exposes no public list of destinations
        unknown = sorted(set(saved) - known)
        if unknown:
            raise DataError(f"{first.config}: config keys {unknown} are not options of {parser.prog}; remove them")
        for action in parser._actions:
            if action.dest in saved:
                action.required = False
        parser.set_defaults(**saved)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    try:
        return build_config(cls, values)
    except DataError:
        raise
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))  # exits


def run_main(main: Callable[[list[str] | None], Any], prog: str, argv: list[str] | None = None) -> Any:
    """Run a stage's ``main``; a DataError becomes one line on stderr (rank 0 only) and exit status 2."""
    try:
        return main(argv)
    except DataError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def log_to_stderr(logger_name: str) -> None:
    """Log ``logger_name`` to stderr with the rank in front: INFO on rank 0, WARNING on the others.

    A handler of our own because TorchRec configures the root logger on
    import, so ``logging.basicConfig`` would be a silent no-op.
    """
    rank = os.environ.get("RANK", "0")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == "0" else logging.WARNING)
    logger.propagate = False
