"""The layout rule: folders are the pipeline and imports run one way.

``sidrank`` (the shared base) <- ``ingest`` <- ``tokenizer`` <- ``features``
<- ``ranking`` <- ``demo`` (the whole chain) <- ``benchmarks``: a package imports the base and earlier
stages only, no package imports ``feature_repo`` (Feast reads it; the ranker
asks Feast for a service by name), and no module uses another module's
``_private`` name. The checker is tested on planted violations too, so it
cannot pass by reading nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from builders import PROJECT_ROOT

ROOT = PROJECT_ROOT
# Position in the pipeline; a package may import only packages at a lower or equal position.
STAGES = {"sidrank": 0, "ingest": 1, "tokenizer": 2, "features": 3, "feature_repo": 3, "ranking": 4, "demo": 5, "benchmarks": 6}
# Read by Feast alone.
NEVER_IMPORTED = {"feature_repo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) of every project import, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level] if node.level else []
                base = ".".join([*package, *([base] if base else [])])
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return [(line, name, names) for line, name, names in found if name.split(".")[0] in STAGES]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, module: str) -> list[str]:
    """Every layering rule ``source`` (the text of ``module``) breaks, one line each."""
    tree = ast.parse(source)
    package = module.split(".")[0]
    problems = []
    module_aliases: dict[str, str] = {}
    for line, target, names in imported_modules(tree, module):
        target_package = target.split(".")[0]
        if target_package in NEVER_IMPORTED and package != target_package:
            problems.append(f"{module}:{line} imports {target}: nothing imports the Feast repo")
        elif STAGES[target_package] > STAGES[package]:
            problems.append(f"{module}:{line} imports {target}: a later stage than {package}")
        for name in names:
            if is_private(name) and target != module:
                problems.append(f"{module}:{line} imports the private name {target}.{name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in STAGES:
                    module_aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in STAGES:
            for alias in node.names:
                module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
            and is_private(node.attr)
        ):
            problems.append(f"{module}:{node.lineno} uses the private name {module_aliases[node.value.id]}.{node.attr}")
    return problems


def project_modules() -> list[tuple[Path, str]]:
    return [
        (path, module_name(path))
        for package in STAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]


def test_every_package_of_the_pipeline_is_checked() -> None:
    packages = {module.split(".")[0] for _, module in project_modules()}
    assert packages == set(STAGES)
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"feature_repo"}
    assert on_disk <= set(STAGES), f"a package outside the pipeline order: {sorted(on_disk - set(STAGES))}"


def test_imports_run_one_way_and_no_private_name_crosses_a_module() -> None:
    problems = [p for path, module in project_modules() for p in violations(path.read_text(), module)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from ranking.model import build_model\n", "features.build", "a later stage than features"),
        ("import benchmarks.report\n", "sidrank.io", "a later stage than sidrank"),
        ("from tokenizer import train\n", "ingest.cli", "a later stage than ingest"),
        ("from . import model\n", "sidrank.metrics", None),
        ("from feature_repo import definitions\n", "ranking.train", "nothing imports the Feast repo"),
        ("from ranking.train import _init_distributed\n", "benchmarks.throughput_worker", "private name"),
        ("from ranking import train\ntrain._log_to_stderr()\n", "ranking.serve", "private name ranking.train"),
        ("from sidrank.io import write_json\nfrom ingest.dataset import make_events\n", "tokenizer.train", None),
    ],
)
def test_the_checker_finds_planted_violations(source: str, module: str, expected: str | None) -> None:
    found = violations(source, module)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
