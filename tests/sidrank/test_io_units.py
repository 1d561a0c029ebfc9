"""Units of files (sidrank.io.publish_unit / require_complete_unit): all or nothing, also under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidrank.io import UNIT_MANIFEST, publish_unit, read_unit_file, require_built_from, require_complete_unit
from sidrank.schema import DataError

REBUILD = "python -m make-it"


def publish(folder: Path, files: dict[str, str], built_from: dict[str, str] | None = None) -> None:
    with publish_unit(folder, built_from=built_from) as staging:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def test_a_published_unit_is_read_back_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    publish(tmp_path, {"a.txt": "old a", "gone.txt": "old only", "sub/b.txt": "old b"})
    (tmp_path / "later-stage").mkdir()  # not part of the unit: left alone
    publish(tmp_path, {"a.txt": "new a", "sub/b.txt": "new b"}, {"dataset": "d1"})
    manifest = require_complete_unit(tmp_path, REBUILD, built_from={"dataset": "d1"}, files=("a.txt",))
    assert sorted(manifest["files"]) == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a" and not (tmp_path / "gone.txt").exists()
    assert (tmp_path / "later-stage").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failing_writer_leaves_the_old_unit(tmp_path: Path) -> None:
    publish(tmp_path, {"a.txt": "old"})
    with pytest.raises(OSError, match="disk full"), publish_unit(tmp_path) as staging:
        (staging / "a.txt").write_text("half")
        raise OSError("disk full")
    require_complete_unit(tmp_path, REBUILD)
    assert (tmp_path / "a.txt").read_text() == "old"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / UNIT_MANIFEST).unlink(), "incomplete or missing"),
        (lambda d: (d / "a.txt").write_text("edited"), "missing or changed"),
        (lambda d: (d / "a.txt").unlink(), "missing or changed"),
        # A manifest entry without its size (hand-edited) is a DataError, not a KeyError.
        (lambda d: (d / UNIT_MANIFEST).write_text('{"files": {"a.txt": {"sha256": "0"}}}'), "unreadable unit manifest"),
        (lambda d: (d / UNIT_MANIFEST).write_text('{"files": {"a.txt": "x"}}'), "unreadable unit manifest"),
    ],
)
def test_readers_refuse_an_incomplete_or_changed_unit(tmp_path: Path, damage, message: str) -> None:
    publish(tmp_path, {"a.txt": "a"})
    damage(tmp_path)
    with pytest.raises(DataError, match=f"{message}.*{REBUILD}"):
        require_complete_unit(tmp_path, REBUILD)


def test_readers_refuse_a_unit_built_from_another_upstream(tmp_path: Path) -> None:
    publish(tmp_path, {"a.txt": "a"}, {"dataset": "old-digest"})
    with pytest.raises(DataError, match="stale, built from another dataset"):
        require_complete_unit(tmp_path, REBUILD, built_from={"dataset": "new-digest"})


def test_a_checked_manifest_is_compared_with_upstream_digests_without_hashing_again(tmp_path: Path) -> None:
    publish(tmp_path, {"a.txt": "a"}, {"dataset": "d1"})
    manifest = require_complete_unit(tmp_path, REBUILD)
    require_built_from(tmp_path, manifest, REBUILD, {"dataset": "d1"})
    with pytest.raises(DataError, match=f"stale, built from another dataset.*{REBUILD}"):
        require_built_from(tmp_path, manifest, REBUILD, {"dataset": "d2"})


def test_a_unit_file_read_after_the_check_must_still_be_the_checked_one(tmp_path: Path) -> None:
    """A unit replaced between the check and the read is refused, not paired with the old manifest."""
    publish(tmp_path, {"a.txt": "old a"})
    manifest = require_complete_unit(tmp_path, REBUILD)
    assert read_unit_file(tmp_path, manifest, "a.txt", REBUILD) == b"old a"
    with pytest.raises(DataError, match=f"b.txt: not part of the unit.*{REBUILD}"):
        read_unit_file(tmp_path, manifest, "b.txt", REBUILD)
    publish(tmp_path, {"a.txt": "new a"})
    with pytest.raises(DataError, match=f"a.txt: missing or changed.*{REBUILD}"):
        read_unit_file(tmp_path, manifest, "a.txt", REBUILD)
    (tmp_path / "a.txt").unlink()
    with pytest.raises(DataError, match=f"a.txt: missing or changed.*{REBUILD}"):
        read_unit_file(tmp_path, manifest, "a.txt", REBUILD)


def test_sigkill_after_the_first_rename_leaves_a_unit_readers_refuse_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    """The process dies right after moving its first file into place (no finally, no cleanup runs)."""
    publish(tmp_path, {"a.txt": "old a", "b.txt": "old b"})
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from sidrank.io import publish_unit
        real_replace = os.replace
        def replace_then_die(source, target):
            real_replace(source, target)
            if Path(target).name == "a.txt":
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace_then_die
        with publish_unit(Path({str(tmp_path)!r})) as staging:
            (staging / "a.txt").write_text("new a")
            (staging / "b.txt").write_text("new b")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == -signal.SIGKILL
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "b.txt").read_text() == "old b"  # a mix
    with pytest.raises(DataError, match="incomplete or missing"):
        require_complete_unit(tmp_path, REBUILD)
    assert any(p.name.startswith(".staging-") for p in tmp_path.iterdir())
    publish(tmp_path, {"a.txt": "a", "b.txt": "b"})
    require_complete_unit(tmp_path, REBUILD)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", UNIT_MANIFEST]
