"""Every ```python block of README.md runs as written: in order, in one namespace (a later block
may use what an earlier one defined, as a reader would), from the repository root, and leaves
nothing behind in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block, in order (line: where the code starts)."""
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.S | re.M):
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return blocks


def _untracked() -> set[str]:
    """Untracked and ignored paths (ignored folders collapsed), caches aside."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO,
                          capture_output=True, text=True, check=True)  # fmt: skip
    caches = ("__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache")
    return {line[3:] for line in done.stdout.splitlines()
            if line[:2] in ("??", "!!") and not any(c in line for c in caches)}  # fmt: skip


def test_the_block_finder_finds_blocks_and_their_lines():
    text = "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\ny = x + 1\n```\n```bash\nz\n```\n"
    assert python_blocks(text) == [(4, "x = 1\n"), (10, "y = x + 1\n")]


def test_every_python_block_of_the_readme_runs_in_order(monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "the README's python blocks were not found"
    monkeypatch.chdir(REPO)
    before = _untracked() if (REPO / ".git").exists() else None
    namespace: dict = {"__name__": "__readme__"}
    for line, code in blocks:
        try:
            exec(compile(code, f"README.md, the python block at line {line}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"README.md, the python block at line {line}: {type(err).__name__}: {err}")
    capsys.readouterr()
    if before is not None:
        new = sorted(_untracked() - before)
        assert not new, f"README blocks wrote into the repository: {new[:5]}"
