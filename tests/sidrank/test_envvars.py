"""sidrank.envvars.env_override: variables set or unset inside the block, each restored after."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidrank.envvars import env_override

SET, UNSET, ADDED = "SIDRANK_TEST_SET", "SIDRANK_TEST_UNSET", "SIDRANK_TEST_ADDED"


@pytest.fixture(autouse=True)
def variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SET, "before")
    monkeypatch.setenv(UNSET, "before")
    monkeypatch.delenv(ADDED, raising=False)


def test_values_are_set_and_unset_inside_the_block_and_restored_after() -> None:
    with env_override({SET: "inside", UNSET: None, ADDED: "new"}):
        assert (os.environ[SET], os.environ.get(UNSET), os.environ[ADDED]) == ("inside", None, "new")
        child = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{ADDED}'])"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "new"  # child processes inherit the block's environment
        os.environ[SET] = "changed by the block"
    assert (os.environ[SET], os.environ[UNSET], os.environ.get(ADDED)) == ("before", "before", None)


def test_the_environment_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), env_override({SET: "inside", UNSET: None, ADDED: "new"}):
        raise RuntimeError("boom")
    assert (os.environ[SET], os.environ[UNSET], os.environ.get(ADDED)) == ("before", "before", None)


def test_unsetting_an_unset_variable_is_no_error() -> None:
    with env_override({ADDED: None}):
        assert ADDED not in os.environ
    assert ADDED not in os.environ
