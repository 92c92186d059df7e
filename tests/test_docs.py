"""The documentation site builds without a warning, and each method page's settings table is the
method registry's.

``mkdocs build --strict`` (mkdocs.yml: mkdocstrings' API reference from the docstrings, links and
anchors validated) into a temporary folder: a broken internal link, a missing anchor, a page
left out of the navigation or a docstring griffe cannot parse fails the test with mkdocs'
message. The settings tables (after a ``<!-- settings: <method> -->`` marker on the method
pages) must list exactly the registry's settings (``far_ho2/registry.py`` and each method's
``settings``), in order, with their flag, type, default and valid values, so that the pages
cannot drift from the code; every registered method of the library has such a table. The
README's relative links (to the pages, which mkdocs does not see) point at files and headings
that exist.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import far_ho2 as far

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD_PAGES = ROOT / "docs" / "methods"
SETTINGS_MARKER = re.compile(r"^<!--\s*settings:\s*(?P<method>\w+)\s*-->\s*$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
HEADER = ["setting", "flag", "type", "default", "valid values", "where the default comes from"]


def settings_tables(text: str, path: str) -> list[tuple[str, list[list[str]]]]:
    """The (method, rows) of every table right after a settings marker; a row is its cells.

    Raises:
        ValueError: if a marker is not followed by a table with the expected header.
    """
    lines, tables = text.splitlines(), []
    for i, line in enumerate(lines):
        marker = SETTINGS_MARKER.match(line)
        if not marker:
            continue
        table = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            table.append([cell.strip() for cell in row.strip().strip("|").split("|")])
        if len(table) < 2 or table[0] != HEADER:
            raise ValueError(f"{path}:{i + 1}: a settings marker must be followed by a table whose header "
                             f"is {' | '.join(HEADER)}.")
        tables.append((marker["method"], table[2:]))
    return tables


def expected_row(method: far.registry.Method, setting: far.Setting) -> list[str]:
    """The first five cells of ``setting``'s row: name, flag, type, default, valid values."""
    return [f"`{setting.name}`", f"`--{method.flag(setting)}`", setting.type.__name__,
            f"`{setting.default!r}`", setting.range()]


def test_each_method_page_lists_the_registry_settings() -> None:
    """Every settings table equals its method's registry settings, and every method registered
    by the library has one."""
    documented = set()
    for page in sorted(METHOD_PAGES.glob("*.md")):
        path = str(page.relative_to(ROOT))
        for name, rows in settings_tables(page.read_text(encoding="utf-8"), path):
            method = far.registry.get_method(name)
            assert [row[:5] for row in rows] == [expected_row(method, s) for s in method.settings], (
                f"{path}: the settings table of {name!r} differs from the registry's (far_ho2/registry.py and "
                f"{method.cls.__name__}.settings)")
            assert all(len(row) == len(HEADER) and row[5] for row in rows), (
                f"{path}: every setting of {name!r} needs where its default comes from")
            documented.add(name)
    assert documented == set(far.methods()), (
        f"methods without a settings table in docs/methods/: {sorted(set(far.methods()) - documented)}")


def test_settings_tables_parser() -> None:
    """A marker takes the table after it; a marker without one is an error."""
    text = ("<!-- settings: reverse -->\n| " + " | ".join(HEADER) + " |\n| --- |\n"
            "| `truncate` | `--truncate` | int | `0` | an int ≥ 0 | FAR-HO |\n\nText.\n")
    assert settings_tables(text, "p.md") == [
        ("reverse", [["`truncate`", "`--truncate`", "int", "`0`", "an int ≥ 0", "FAR-HO"]])]
    with pytest.raises(ValueError, match="p.md:1: a settings marker must be followed by a table"):
        settings_tables("<!-- settings: bome -->\n\n| a |\n", "p.md")


def test_mkdocs_build_strict_has_no_warning(tmp_path: pathlib.Path) -> None:
    """``mkdocs build --strict`` succeeds and prints no warning."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # material's notice about its successor, not a warning
    process = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = process.stdout + process.stderr
    warnings = [line for line in output.splitlines() if re.search(r"\bWARNING\b|\bERROR\b", line)]
    assert process.returncode == 0 and not warnings, f"mkdocs build --strict failed:\n{output[-6000:]}"
    assert (tmp_path / "site" / "api" / "far_ho2" / "index.html").is_file()


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings, as mkdocs' toc extension makes them (lower case, words
    joined by hyphens, other punctuation dropped), outside code blocks."""
    found, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\s-]", "", title)
            found.add(re.sub(r"[-\s]+", "-", title).strip("-"))
    return found


def test_readme_links_point_at_existing_pages_and_headings() -> None:
    """Every relative link of README.md names a file of the repository, and its ``#anchor`` a
    heading of that file."""
    broken = []
    for match in LINK.finditer((ROOT / "README.md").read_text(encoding="utf-8")):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.is_file() or (anchor and anchor not in anchors(file.read_text(encoding="utf-8"))):
            broken.append(target)
    assert not broken, f"README.md links to missing files or headings: {broken}"
