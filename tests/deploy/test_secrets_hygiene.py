"""Token files stay out of version control, and the docs never suggest putting one in the checkout."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .conftest import ROOT


@pytest.mark.parametrize("path", ["tokens.yaml", "tokens.json", "deploy/tokens.yaml"])
def test_token_files_are_git_ignored(path: str) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30)
    assert result.returncode == 0, f"{path} is not git-ignored"


def test_readme_keeps_the_tokens_file_outside_the_checkout() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in re.findall(r"^.*tokens\.example\.yaml.*$", readme, re.M):
        destination = command.split("#")[0].split()[-1]
        assert destination.startswith(("~", "/", "$")), command
