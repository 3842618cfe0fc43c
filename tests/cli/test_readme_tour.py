"""The README's tour runs as written: every command of its ```bash blocks, in order, in a fresh directory.

The tour is the "## Tour" section of README.md. Until README.md has one, the tour text proposed for it
(docs/tour.md) is run instead, with a warning, so that the text stays true either way.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import warnings
from pathlib import Path

import pytest
from cli_helpers import REPO, python_env

pytestmark = pytest.mark.multiproc

HEADING = "## Tour"
TIMEOUT = 900  # per command; a healthy tour takes about a minute in all


def tour_section(markdown: str) -> str | None:
    """The text under the "## Tour" heading, up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == HEADING:
            body = []
            fenced = False
            for rest in lines[i + 1 :]:
                if rest.lstrip().startswith("```"):
                    fenced = not fenced
                if not fenced and re.match(r"#{1,2} ", rest):
                    break
                body.append(rest)
            return "\n".join(body)
    return None


def tour_commands(section: str) -> list[str]:
    """Shell commands of the ```bash blocks (comments and blank lines dropped, backslash continuations joined)."""
    commands: list[str] = []
    for block in re.findall(r"^```(?:bash|sh|shell)\s*\n(.*?)^```", section, re.M | re.S):
        pending = ""
        for line in block.splitlines():
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1].rstrip()
                continue
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def _tour() -> tuple[str, list[str]]:
    readme = REPO / "README.md"
    section = tour_section(readme.read_text()) if readme.is_file() else None
    if section is not None:
        return "README.md", tour_commands(section)
    proposed = tour_section((REPO / "docs" / "tour.md").read_text())
    assert proposed is not None, "docs/tour.md has no '## Tour' section"
    warnings.warn(
        "README.md has no '## Tour' section yet: running the proposed tour in docs/tour.md", stacklevel=1
    )
    return "docs/tour.md", tour_commands(proposed)


def test_tour_extraction() -> None:
    text = "intro\n## Tour\nsay\n```bash\n# a comment\nshardwise plan a \\\n  --cluster b\n\nls\n```\n## Next\n```bash\nno\n```"
    assert tour_commands(tour_section(text) or "") == ["shardwise plan a --cluster b", "ls"]


def test_tour_runs_as_written(tmp_path: Path) -> None:
    where, commands = _tour()
    joined = "\n".join(commands)
    # the tour shows what the README promises: a DGX plan read three ways, a local run, an exported package
    for needed in ("shardwise plan", "--cluster dgx", "shardwise show", "shardwise explain", "shardwise report",
                   "shardwise run", "shardwise codegen", "torchrun"):  # fmt: skip
        assert needed in joined, f"the tour in {where} lacks `{needed}`"
    env = python_env()
    for command in commands:
        shlex.split(command)  # a command a shell can parse
        run = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT,
        )  # fmt: skip
        assert run.returncode == 0, f"{where}: `{command}` exited {run.returncode}\n{run.stderr[-3000:]}"
        assert "Traceback" not in run.stderr, f"{where}: `{command}`\n{run.stderr[-3000:]}"
