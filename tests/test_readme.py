"""The docs cannot rot: the Python blocks of README.md and docs/guide.md run as pasted,
and every benchmark command of README.md and docs/*.md parses with the script's own parser."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GUIDE = REPO / "docs" / "guide.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str, path: Path) -> dict[str, str]:
    """The ``language`` code blocks of ``path``, keyed by where they start (``README.md:42``)."""
    text = path.read_text()
    return {
        f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}": match[1]
        for match in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)
    }


def benchmark_commands() -> dict[str, str]:
    """Every ``benchmarks/<script>.py ...`` command of the bash blocks, ``$NAME`` expanded.

    Commands after a ``git checkout`` in the same block run another version of
    the scripts and are left out.
    """
    commands = {}
    for path in DOCUMENTS:
        for where, block in blocks("bash", path).items():
            variables: dict[str, str] = {}
            for k, line in enumerate(block.replace("\\\n", " ").splitlines()):
                line = re.sub(r"(^|\s)#.*", "", line).strip()
                if line.startswith("git checkout"):
                    break
                if assignment := re.fullmatch(r"(\w+)=(.*)", line):
                    variables[assignment[1]] = shlex.split(assignment[2])[0]
                elif "benchmarks/" in line:
                    for name, value in variables.items():
                        line = line.replace(f"${name}", value)
                    commands[f"{where}+{k}"] = line
    return commands


PYTHON_BLOCKS = {**blocks("python", README), **blocks("python", GUIDE)}
COMMANDS = benchmark_commands()


def test_docs_hold_what_these_tests_read():
    assert len(PYTHON_BLOCKS) >= 8
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("block", PYTHON_BLOCKS.values(), ids=PYTHON_BLOCKS.keys())
def test_python_block_runs_as_pasted(block, tmp_path):
    # A fresh interpreter in an empty folder: nothing but the block itself.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "a block of the docs should show its result"


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_benchmark_command_parses(command, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    words = shlex.split(command)
    script = next(i for i, word in enumerate(words) if word.startswith("benchmarks/"))
    assert (REPO / words[script]).is_file(), words[script]
    module = importlib.import_module(Path(words[script]).stem)
    try:
        module.parse_args(words[script + 1 :])
    except SystemExit as exit:
        pytest.fail(f"{command!r}: the script's parser rejects it (exit {exit.code})")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_local_links_and_images_resolve_from_their_document(document):
    # GitHub resolves a relative link from the folder of the file that holds it.
    targets = [m[1].split("#")[0] for m in LINK.finditer(document.read_text())]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]
    assert local, f"{document.name} holds no local link: the pattern is stale"
    missing = [t for t in local if not (document.parent / t).exists()]
    assert not missing, f"{document.name}: links that resolve to nothing: {missing}"
