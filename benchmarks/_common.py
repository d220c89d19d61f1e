"""What the benchmark scripts share: which code a measurement ran on.

Imported as `from _common import commit` (a script's own folder is first on sys.path)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commit(repo: Path = REPO) -> str:
    """The short commit of `repo`, "+dirty" where dlrun/ or configs/ differ from it (the code a
    number was measured on, not the benchmark scripts' own edits)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "dlrun", "configs"],
        capture_output=True, text=True, cwd=repo,
    ).stdout.strip()  # fmt: skip
    return head + ("+dirty" if dirty else "")
