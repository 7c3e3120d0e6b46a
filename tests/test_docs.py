"""The documentation site: it builds with warnings as errors, and every example in docs/ runs.

How the pages' code blocks are treated (the contract for whoever writes a page):

* ```` ```python ```` blocks run, in page order, in one namespace per page;
* ```` ```bash ```` blocks run line by line (a trailing backslash continues a line, ``#`` starts a
  comment): lines starting with ``metarl `` run the installed ``metarl`` command, lines starting with
  ``python `` run this interpreter; any other command fails this test, so a shell line that cannot run
  here (an installer, ``tensorboard``, an hours-long training) belongs in a ```` ```text ```` block with
  a sentence saying why;
* a block with a ``title="path"`` (mkdocs-material shows it as a file name) is written to that path
  instead of running, for the blocks after it to use (a suite YAML, a module that registers an env);
* everything else (```` ```text ````, ```` ```yaml ```` without a title, ...) is only shown.

Each page runs in a fresh temporary folder holding a copy of ``experiments/``, so the paths in the
examples are the ones a user types at the repository root, runs land in that folder's ``runs/``, and
nothing in the checkout is written. Examples keep to seconds: toy budgets, ``sampler.workers=0``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
TITLE = re.compile(r"""title=["']([^"']+)["']""")


def blocks(page: Path) -> list[tuple[str, str | None, str, int]]:
    """The fenced code blocks of a page: (language, title, code, line number)."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip()
        lang = info.split()[0].lstrip(".{") if info else ""
        title = TITLE.search(info)
        indent = m.group("indent")
        code = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in m.group("body").splitlines(keepends=True))
        found.append((lang, title.group(1) if title else None, code, text.count("\n", 0, m.start()) + 1))
    return found


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        words = shlex.split(current, comments=True)
        if words:
            commands.append(current.strip())
        current = ""
    return commands


def runnable(page: Path) -> bool:
    return any(lang in ("python", "bash") or title for lang, title, _, _ in blocks(page))


PAGES = sorted(p for p in DOCS.glob("*.md") if runnable(p))


def metarl_command() -> list[str]:
    script = Path(sys.executable).parent / "metarl"
    if script.is_file():
        return [str(script)]
    found = shutil.which("metarl")
    # `python -P` keeps the current folder off sys.path, as the installed script does (docs: Reliability)
    return [found] if found else [sys.executable, "-P", "-m", "metarl.cli"]


#: Languages a page may use. Only python and bash run; the others are shown. An alias such as ``py`` or
#: ``sh`` would be highlighted the same and silently skipped, so it is refused.
SHOWN = {"text", "yaml", "json", "toml"}


def test_every_block_is_run_or_deliberately_shown():
    assert PAGES, "no page in docs/ has a runnable example"
    for page in sorted(DOCS.glob("*.md")):
        for lang, _, _, line in blocks(page):
            assert lang in SHOWN | {"python", "bash"}, (
                f"{page.name}:{line}: ```{lang} is neither run (python, bash) nor one of {sorted(SHOWN)}")


def test_block_rules(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('Text\n\n```python\nx = 1\n```\n\n!!! note\n    ```bash\n    metarl train a.yaml \\\n'
                    '        seed=1   # comment\n    # only a comment\n    metarl eval runs/x\n    ```\n\n'
                    '```yaml title="s.yaml"\nname: s\n```\n')
    found = blocks(page)
    assert [(lang, title) for lang, title, _, _ in found] == [("python", None), ("bash", None), ("yaml", "s.yaml")]
    commands = [shlex.split(c, comments=True) for c in shell_commands(found[1][2])]
    assert commands == [["metarl", "train", "a.yaml", "seed=1"], ["metarl", "eval", "runs/x"]]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]', which scripts/setup.sh does)")
def test_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_examples_run(page: Path, tmp_path, monkeypatch):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "experiments", work / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__", "*.gif"))
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # a module a page writes can be imported by the next block
    env = {**os.environ, "MPLBACKEND": "Agg"}
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for lang, title, code, line in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        if title:
            target = work / title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code, encoding="utf-8")
        elif lang == "python":
            exec(compile(code, where, "exec"), namespace)
        elif lang == "bash":
            for command in shell_commands(code):
                words = shlex.split(command, comments=True)
                if words[0] == "metarl":
                    argv = metarl_command() + words[1:]
                elif words[0] == "python":
                    argv = [sys.executable] + words[1:]
                else:
                    pytest.fail(f"{where}: `{command}` cannot run in a test: write metarl/python commands in "
                                "```bash blocks and show other shell lines in a ```text block")
                done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
