"""The stage command lines: each names itself ``python -m ...``, documents every option with its
default, and reports bad input as one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import demo
from benchmarks import auc as bench_auc
from benchmarks import auc_ablation as bench_auc_ablation
from benchmarks import feature_store as bench_feature_store
from benchmarks import gpu_smoke as bench_gpu_smoke
from benchmarks import plots as bench_plots
from benchmarks import scale as bench_scale
from benchmarks import throughput as bench_throughput
from benchmarks import tokenizer_speed as bench_tokenizer_speed
from benchmarks import tokenizers as bench_tokenizers
from features import build as feature_build, publish
from ingest import cli as ingest_cli
from ranking import serve
from ranking import train as ranking_train
from sidrank.cli import run_main
from tokenizer import finetune, modalities, train
from builders import PROJECT_ROOT

ROOT = PROJECT_ROOT

# (what --help names, the entry point, the arguments before --help)
COMMANDS = [
    ("python -m ingest", ingest_cli.main, []),
    *[(f"python -m ingest {source}", ingest_cli.main, [source]) for source in ingest_cli.SOURCES],
    ("python -m tokenizer.train", train.main, []),
    ("python -m tokenizer.finetune", finetune.main, []),
    ("python -m tokenizer.modalities", modalities.main, []),
    ("python -m features.build", feature_build.main, []),
    ("python -m features.publish", publish.main, []),
    ("python -m ranking.serve", serve.main, []),
    ("python -m ranking.serve rank", serve.main, ["rank"]),
    ("python -m ranking.serve http", serve.main, ["http"]),
    ("python -m ranking.train", ranking_train.main, []),
    ("python -m demo", demo.main, []),
    ("python -m benchmarks.auc", bench_auc.main, []),
    ("python -m benchmarks.plots", bench_plots.main, []),
    ("python -m benchmarks.gpu_smoke", bench_gpu_smoke.main, []),
    ("python -m benchmarks.feature_store", bench_feature_store.main, []),
    ("python -m benchmarks.auc_ablation", bench_auc_ablation.main, []),
    ("python -m benchmarks.scale", bench_scale.main, []),
    ("python -m benchmarks.throughput", bench_throughput.main, []),
    ("python -m benchmarks.tokenizer_speed", bench_tokenizer_speed.main, []),
    ("python -m benchmarks.tokenizers", bench_tokenizers.main, []),
]
# The module whose `__main__` block runs each program.
ENTRY_MODULES = {
    "python -m ingest": "ingest/__main__.py",
    "python -m tokenizer.train": "tokenizer/train.py",
    "python -m tokenizer.finetune": "tokenizer/finetune.py",
    "python -m tokenizer.modalities": "tokenizer/modalities.py",
    "python -m features.build": "features/build.py",
    "python -m features.publish": "features/publish.py",
    "python -m ranking.serve": "ranking/serve.py",
}


def help_parser(main: Callable, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser that ``main([*argv, "--help"])`` prints its help from."""
    shown: list[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda parser, file=None: shown.append(parser))
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0 and shown
    return shown[-1]


@pytest.mark.parametrize(("prog", "main", "argv"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_names_the_program_and_shows_every_option_with_its_default(
    prog: str, main: Callable, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = help_parser(main, argv, monkeypatch)
    assert parser.prog == prog
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:  # argparse offers no public list of a parser's options
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings)
        assert action.help and action.help.strip(), f"{prog} {name}: no help text"
        if action.required:
            # A required option has no default to show; "(default: None)" would mislead.
            assert not shows_defaults or action.default is argparse.SUPPRESS, f"{prog} {name}: shows a default"
        else:
            assert shows_defaults or "%(default)" in action.help, f"{prog} {name}: default not shown"


def bad_inputs(tmp_path: Path) -> list[tuple[str, Callable, list[str]]]:
    """(program, entry point, arguments naming an empty folder) for every stage that reads a dataset or run."""
    empty = str(tmp_path / "empty")
    repo = str(ROOT / "feature_repo")
    return [
        ("python -m ingest", ingest_cli.main, ["grouplens", "--path", empty, "--out", str(tmp_path / "out")]),
        ("python -m tokenizer.train", train.main, ["--dataset", empty]),
        ("python -m tokenizer.finetune", finetune.main, ["--dataset", empty]),
        ("python -m tokenizer.modalities", modalities.main, ["--dataset", empty]),
        ("python -m features.build", feature_build.main, ["--dataset", empty]),
        ("python -m features.publish", publish.main, ["--dataset", empty, "--repo", repo, "--no-materialize"]),
        ("python -m ranking.serve", serve.main,
         ["rank", "--run", empty, "--repo", repo, "--user", "1", "--items", "1"]),
    ]


@pytest.mark.parametrize("index", range(7))
def test_bad_input_is_one_line_and_exit_status_2(index: int, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prog, main, argv = bad_inputs(tmp_path)[index]
    with pytest.raises(SystemExit) as exited:
        run_main(main, prog, argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and "empty" in last, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("prog", "path"), sorted(ENTRY_MODULES.items()))
def test_every_program_runs_its_main_through_run_main(prog: str, path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    calls = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "run_main"
    ]  # fmt: skip
    assert calls, f"{path}: `{prog}` does not go through sidrank.cli.run_main (a DataError would print a traceback)"
