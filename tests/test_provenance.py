"""Provenance names oodbench's own commit only: an installed copy in a venv inside the user's
repository must not record the user's commit as oodbench's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from oodbench.provenance import git_commit


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_is_recorded_only_for_the_top_of_a_checkout(tmp_path):
    repo = tmp_path / "project"
    site = repo / ".venv" / "lib" / "site-packages"  # oodbench installed inside a user's repo
    site.mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "f.txt").write_text("x")
    _git(repo, "add", "f.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == {"commit": head, "dirty": False}
    (repo / "f.txt").write_text("changed")
    assert git_commit(repo) == {"commit": head, "dirty": True}
    assert git_commit(site) is None  # the user's commit is not oodbench's
    assert git_commit(tmp_path) is None  # not a checkout at all
