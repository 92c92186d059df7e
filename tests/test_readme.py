"""Every ```python block of the documentation runs: README.md and any ``docs/**/*.md``.

How the blocks run: the blocks of one Markdown file run in order, in one fresh Python process
per file, as the cells of a notebook: a block may use the names defined by the blocks above it
in the same file (the README says so), never those of another file. One process per file
imports TensorFlow once (3-5 s) instead of once per block. Each block is compiled with the
Markdown file as its file name and its own line numbers, so a traceback points at the README's
line. The process runs in an empty temporary folder holding a link to the repository's
``data/`` (the README's commands run from the repository root; what a block writes, such as
``runs/``, lands in the temporary folder), with the repository first on ``PYTHONPATH``.

Sizes: the test sets the environment variable ``FAR_HO2_DOCS_QUICK=1`` (`QUICK_SWITCH`). A
block that would train for minutes reads it, in the open, into ``quick`` and uses it in its
sizes (``steps_per_epoch=5 if quick else 250``); the other blocks run at their printed sizes.
The alternative, rewriting numeric literals before running, would run code the reader never
sees; with the switch CI runs the blocks byte for byte as printed, and a reader's copy runs
at full size.

Excluding a block: only with the line ``<!-- not run: <reason> -->`` right before its fence,
and only if ``(file, reason)`` is listed in `NOT_RUN`; a marker not listed, a listed one that is
gone, or a marker that is not right before a Python fence fails the test, so exclusions cannot
grow silently. Make blocks runnable instead whenever possible (none is excluded today).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICK_SWITCH = "FAR_HO2_DOCS_QUICK"
TIMEOUT = 600  # seconds per Markdown file
PACKAGES = ("far_ho2", "hyper_repr", "flags", "benchmarks")  # a warning from these fails a block
LANGUAGES = {"python", "py", "python3"}
NOT_RUN_MARKER = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
NOT_RUN_LIKE = re.compile(r"<!--\s*not[\s_-]*run", re.IGNORECASE)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

# The blocks excluded on purpose: (Markdown file relative to the repository, reason of its
# `<!-- not run: reason -->` marker), one entry per marker. Keep it empty; an entry needs a
# reason a reviewer accepts.
NOT_RUN: list[tuple[str, str]] = []


def documents(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """The Markdown files whose Python blocks must run: README.md and docs/**/*.md."""
    docs = root / "docs"
    return [root / "README.md"] + (sorted(docs.rglob("*.md")) if docs.is_dir() else [])


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced Python block: its file, the line of its first code line (1-based), its code."""
    path: str
    line: int
    source: str


def _language(info: str) -> str:
    """The language of a fence's info string (its first word, lower case)."""
    return info.split()[0].lower() if info.split() else ""


def _closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a block opened by ``fence``: only its character, at least as many."""
    stripped = line.strip()
    return stripped.startswith(fence) and not stripped.strip(fence[0])


def parse(text: str, path: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The Python blocks of a Markdown text to run, and its ``not run`` markers as (line, reason).

    Raises:
        ValueError: for a fence left open, or a marker that is not right before a Python fence.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    markers: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        marker = NOT_RUN_MARKER.match(lines[i])
        if not marker and NOT_RUN_LIKE.search(lines[i]):
            raise ValueError(f"{path}:{i + 1}: write a `not run` marker as `<!-- not run: <reason> -->`.")
        if marker:
            following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not following or _language(following["info"]) not in LANGUAGES:
                raise ValueError(f"{path}:{i + 1}: a `not run` marker must be the line right before "
                                 f"a ```python fence.")
            if not marker["reason"]:
                raise ValueError(f"{path}:{i + 1}: a `not run` marker needs a reason.")
            markers.append((i + 1, marker["reason"]))
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, indent, close = i, len(fence["indent"]), fence["fence"]
        i += 1
        while i < len(lines) and not _closes(lines[i], close):
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: the fence opened here is never closed.")
        skipped = bool(markers) and markers[-1][0] == start  # the marker is on the line before
        if _language(fence["info"]) in LANGUAGES and not skipped:
            code = "\n".join(line[indent:] if not line[:indent].strip() else line.lstrip()
                             for line in lines[start + 1:i])
            blocks.append(Block(path, start + 2, code + "\n"))
        i += 1
    return blocks, markers


# Runs in the fresh process: each block in the namespace of the blocks before it, compiled with
# the Markdown file's name and line numbers; writes what it ran, and the error, to a JSON report.
# A warning shown from the project's packages or from the block itself fails the block too (an
# example that the library warns about has drifted); others (Keras', TensorFlow's) do not.
DRIVER = textwrap.dedent("""
    import json, os, sys, time, traceback, types, warnings
    _blocks, _report_path, _own = json.load(open(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3])
    _main = types.ModuleType("__main__")
    sys.modules["__main__"] = _main
    _report, _warned, _show = [], [], warnings.showwarning
    def _record(message, category, filename, lineno, file=None, line=None):
        path = os.path.abspath(filename)
        if filename in _own or any(path.startswith(prefix) for prefix in _own):
            _warned.append(f'{filename}:{lineno}: {category.__name__}: {message}')
        _show(message, category, filename, lineno, file, line)
    warnings.showwarning = _record  # the filters still decide what is shown
    for _block in _blocks:
        _entry = {"line": _block["line"], "seconds": None, "error": None}
        _warned.clear()
        _report.append(_entry)
        with open(_report_path, "w") as _f:  # a process that dies names the block it ran
            json.dump(_report, _f)
        print(f"--- {_block['path']}:{_block['line']}", flush=True)
        _start = time.perf_counter()
        try:
            _code = compile("\\n" * (_block["line"] - 1) + _block["source"], _block["path"], "exec")
            exec(_code, _main.__dict__)
        except BaseException as _error:  # the traceback from the block's frame, not this loop's
            _entry["error"] = "".join(traceback.format_exception(
                type(_error), _error, _error.__traceback__.tb_next))
        _entry["seconds"] = round(time.perf_counter() - _start, 2)
        if _warned and not _entry["error"]:
            _entry["error"] = "it warned:\\n" + "\\n".join(_warned)
        with open(_report_path, "w") as _f:
            json.dump(_report, _f)
        if _entry["error"]:
            sys.exit(1)
""")


def run_blocks(blocks: list[Block], workdir: pathlib.Path, root: pathlib.Path = ROOT,
               timeout: float = TIMEOUT) -> list[dict]:
    """Runs ``blocks`` in order in one fresh process in ``workdir`` with the quick switch on.

    Returns the report: per block, its line, seconds and error (``None`` if it ran).

    Raises:
        AssertionError: naming the file, the block's line and the error, if a block raises or
            shows a warning from `PACKAGES` or from its own code, or the process dies or times
            out.
    """
    blocks_file, report_file = workdir / "blocks.json", workdir / "report.json"
    blocks_file.write_text(json.dumps([dataclasses.asdict(block) for block in blocks]))
    if (root / "data").is_dir() and not (workdir / "data").exists():
        (workdir / "data").symlink_to(root / "data", target_is_directory=True)
    env = dict(os.environ, **{QUICK_SWITCH: "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    own = [block.path for block in blocks] + [str(root / package) + os.sep for package in PACKAGES]
    try:
        process = subprocess.run([sys.executable, "-c", DRIVER, str(blocks_file), str(report_file),
                                  json.dumps(sorted(set(own)))],
                                 cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        output, died = process.stdout + process.stderr, process.returncode != 0
    except subprocess.TimeoutExpired as error:
        output, died = f"timed out after {timeout} s\n{error.stdout or ''}{error.stderr or ''}", True
    report = json.loads(report_file.read_text()) if report_file.exists() else []
    failed = next((entry for entry in report if entry["error"] or entry["seconds"] is None), None)
    if failed is not None or died:
        where = f"{blocks[0].path}, the block at line {failed['line']}" if failed else blocks[0].path
        error = (failed or {}).get("error") or output[-4000:]
        raise AssertionError(f"{where} failed:\n{error}")
    return report


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("markdown", documents(), ids=_id)
def test_python_blocks_run(markdown: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The file's Python blocks run in order, at the quick sizes, without an error."""
    blocks, _ = parse(markdown.read_text(encoding="utf-8"), _id(markdown))
    if not blocks:
        pytest.skip(f"{_id(markdown)} has no Python block")
    failure, report = None, []
    for block in blocks:  # syntax errors first, without starting a process
        try:
            compile("\n" * (block.line - 1) + block.source, block.path, "exec")
        except SyntaxError as error:
            failure = (f"{block.path}, the block at line {block.line} does not compile:\n"
                       + "".join(traceback.format_exception_only(error)))
            break
    else:
        try:
            report = run_blocks(blocks, tmp_path)
        except AssertionError as error:
            failure = str(error)
    if failure:
        pytest.fail(failure, pytrace=False)  # the message only: the traceback is the block's
    print("\n".join(f"{block.path}:{entry['line']}: {entry['seconds']} s"
                    for block, entry in zip(blocks, report)))


def test_not_run_markers_are_the_listed_ones() -> None:
    """Every ``<!-- not run: reason -->`` marker of the documentation is listed in NOT_RUN, and
    every listed one still exists."""
    found = sorted((_id(markdown), reason) for markdown in documents()
                   for _, reason in parse(markdown.read_text(encoding="utf-8"), _id(markdown))[1])
    assert found == sorted(NOT_RUN), (f"the `not run` markers of the documentation, {found}, are not "
                                      f"those listed in tests/test_readme.py NOT_RUN, {sorted(NOT_RUN)}")


def test_parse_finds_every_python_fence_and_marker() -> None:
    """The parser takes the code of each Python fence (indented ones too) with its first line,
    skips other languages and marked blocks, and rejects a stray marker or an unclosed fence."""
    text = ("# t\n```python\na = 1\n```\n\n```bash\nls\n```\n- item\n\n    ```py\n    b = a + 1\n"
            "    ```\n<!-- not run: needs a GPU -->\n```python\nc = 3\n```\n````python\nd = '```'\n````\n")
    blocks, markers = parse(text, "t.md")
    assert [(b.line, b.source) for b in blocks] == [(3, "a = 1\n"), (12, "b = a + 1\n"), (19, "d = '```'\n")]
    assert markers == [(14, "needs a GPU")]
    with pytest.raises(ValueError, match="t.md:1: a `not run` marker must be the line right before"):
        parse("<!-- not run: x -->\n\n```python\nx\n```\n", "t.md")
    with pytest.raises(ValueError, match="t.md:1: a `not run` marker needs a reason"):
        parse("<!-- not run: -->\n```python\nx\n```\n", "t.md")
    with pytest.raises(ValueError, match="t.md:1: write a `not run` marker as"):
        parse("<!-- Not run because slow -->\n```python\nx\n```\n", "t.md")
    with pytest.raises(ValueError, match="t.md:2: the fence opened here is never closed"):
        parse("x\n```python\nx = 1\n", "t.md")


def test_a_failing_block_is_reported_with_its_file_line_and_error(tmp_path: pathlib.Path) -> None:
    """A block that raises fails the run with the file, the block's line, the traceback at the
    Markdown line and the error; the blocks before it ran, with the switch on."""
    text = ("Intro.\n\n```python\nimport os\nquick = os.environ['FAR_HO2_DOCS_QUICK']\n```\n\n"
            "Then:\n\n```python\nx = 1\ny = x + undefined_name\n```\n")
    blocks, _ = parse(text, "guide.md")
    with pytest.raises(AssertionError) as failure:
        run_blocks(blocks, tmp_path, root=tmp_path)
    message = str(failure.value)
    assert message.startswith("guide.md, the block at line 11 failed:")
    assert 'File "guide.md", line 12' in message
    assert "NameError: name 'undefined_name' is not defined" in message
    assert [entry["line"] for entry in json.loads((tmp_path / "report.json").read_text())] == [4, 11]


def test_a_block_that_warns_fails(tmp_path: pathlib.Path) -> None:
    """A warning shown from the block's own code (or the project's packages) fails the block."""
    text = "```python\nimport warnings\nwarnings.warn('the chain has not mixed')\n```\n"
    blocks, _ = parse(text, "guide.md")
    with pytest.raises(AssertionError, match="(?s)guide.md, the block at line 2 failed:\nit warned:\n"
                                             "guide.md:3: UserWarning: the chain has not mixed"):
        run_blocks(blocks, tmp_path, root=tmp_path)
