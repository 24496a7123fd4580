"""The repository documents itself: no pointer to documents outside it, and every pointer into docs/ resolves.

The package once cited design notes that lived outside the repository (a sibling ``shared`` folder); a user of the
package has none of them. These tests keep it that way and check that every ``docs/<page>.md`` (and
``docs/<page>.md#<section>``) named in the code, the tests, the benchmarks, the README or the docs exists, as do the
relative links of the README and the docs pages (images included), the files and API names the pages mention, and
the site's navigation and API reference (``mkdocs.yml``, ``docs/api.md``) without MkDocs installed: CI's
``mkdocs build --strict`` checks the same and the rendering.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where references may appear.
SCANNED = ("loranull_kernels", "tests", "benchmarks", "csrc", "docs", "README.md", "setup.py", "pyproject.toml",
           "mkdocs.yml", "mkdocs_hooks.py")
# Where the files the docs name by their bare name (``torch_backend.py``: one in each op's folder) may live.
SOURCE_DIRS = ("loranull_kernels", "benchmarks", "tests", "csrc")
# The pages of the site, in its navigation (mkdocs.yml).
PAGES = ("README.md", "getting-started.md", "using-methods.md", "methods.md", "calibration.md", "qlora.md",
         "integrations.md", "benchmarks.md", "reliability.md", "design.md", "performance.md", "development.md",
         "api.md")
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".sh", ".cu", ".cpp", ".h"}

# Spelled in pieces so that this file does not match its own patterns.
_OUTSIDE = re.compile("|".join(re.escape(s) for s in (
    "../" + "shared", "DESIGN" + ".md", "METHODS" + ".md", "PERFORMANCE" + ".md")))
_DOCS_REF = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)(?:#([A-Za-z0-9_-]+))?")
_MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
_SOURCE_PATH = re.compile(r"(?<![\w./*-])((?:[\w-]+/)*[\w-]+\.py)\b")  # a file path named in the docs (no globs)
_API_NAME = re.compile(r"\blk\.([A-Za-z_][\w.]*\w)")  # lk.<name>[.<name>...] named in the docs


def _files() -> list[Path]:
    out = []
    for entry in SCANNED:
        path = ROOT / entry
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out.extend(p for p in sorted(path.rglob("*"))
                       if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped (not ``-`` / ``_``), spaces → ``-``."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _outside_references(text: str) -> list[str]:
    return [m.group(0) for m in _OUTSIDE.finditer(text)]


def _docs_references(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in _DOCS_REF.finditer(text)]


def _docs_text() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))}


def test_patterns_catch_what_they_should():
    # The scanners themselves: a planted outside pointer is found, names that merely contain the words are not.
    planted = "see ../" + "shared/" + "PERFORMANCE" + ".md and " + "DESIGN" + ".md"
    assert len(_outside_references(planted)) == 3
    assert _outside_references("METHODS_NO_CALIB = []; METHODS[variant]; docs/methods.md") == []
    assert _docs_references("(docs/methods.md#kasa), docs/design.md.") == [("methods.md", "kasa"), ("design.md", None)]
    assert _slug(" The torch backend of lora_linear") == "the-torch-backend-of-lora_linear"
    assert _slug("Dropout and the seed contract") == "dropout-and-the-seed-contract"
    assert _SOURCE_PATH.findall("`ops/rsvd_torch.py`, `methods/*.py`, setup.py, ../README.md") == \
        ["ops/rsvd_torch.py", "setup.py"]
    assert _API_NAME.findall("lk.inject(model, ...); lk.integrations.peft.patch(m).") == \
        ["inject", "integrations.peft.patch"]


def test_docs_pages_exist():
    for page in PAGES:
        assert (DOCS / page).is_file(), f"docs/{page} is missing"


def _served() -> dict[str, str]:
    """The repository files the site serves from outside docs/ (mkdocs_hooks.SERVED), read without MkDocs."""
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SERVED


def test_site_navigation_lists_every_page():
    # mkdocs.yml carries a Python tag (the GitHub-style slugs), so its nav entries are read as text.
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\s*- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", nav, re.M)
    served = {target for target in _served().values() if target.endswith(".md")}
    pages = {p.name for p in DOCS.glob("*.md")}
    assert sorted(listed) == sorted(set(listed)), "a page is listed twice in mkdocs.yml's nav"
    assert set(listed) - pages - served == set(), "mkdocs.yml's nav names pages that do not exist"
    assert pages - set(listed) == set(), "docs/ pages missing from mkdocs.yml's nav"
    assert set(PAGES) <= pages


def test_served_repository_files_exist():
    for source in _served():
        assert (ROOT / source).exists(), f"mkdocs_hooks.SERVED names {source}, which does not exist"


def _resolve(dotted: str):
    """The object a ``::: dotted.path`` of the API reference names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_api_reference_names_exist():
    names = re.findall(r"^::: ([\w.]+)\s*$", (DOCS / "api.md").read_text(encoding="utf-8"), re.M)
    assert len(names) >= 20, "the API reference lost its entries"
    missing = []
    for name in names:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, "docs/api.md documents names the package does not have:\n" + "\n".join(missing)


def test_no_reference_to_documents_outside_the_repository():
    files = _files()
    assert any(p.suffix == ".py" for p in files), "found no source file to scan"
    offenders = [f"{p.relative_to(ROOT)}:{n}: {ref}"
                 for p in files
                 for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 for ref in _outside_references(line)]
    assert not offenders, "references to documents outside the repository (point to docs/ instead):\n" + \
        "\n".join(offenders)


def test_docs_references_resolve():
    anchors = {p.name: _anchors(p) for p in DOCS.glob("*.md")}
    broken = []
    for p in _files():
        for page, anchor in _docs_references(p.read_text(encoding="utf-8", errors="replace")):
            if page not in anchors:
                broken.append(f"{p.relative_to(ROOT)}: docs/{page} does not exist")
            elif anchor is not None and anchor not in anchors[page]:
                broken.append(f"{p.relative_to(ROOT)}: docs/{page} has no section #{anchor}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(page):
    source = ROOT / page
    broken = []
    for target in _MD_LINK.findall(source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            broken.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no section #{anchor} in {resolved.name}")
    assert not broken, f"{page}: " + "; ".join(broken)


def _exists(path: str) -> bool:
    if (ROOT / path).exists() or (ROOT / "loranull_kernels" / path).exists():
        return True
    return "/" not in path and any(any((ROOT / d).rglob(path)) for d in SOURCE_DIRS)


def test_files_named_in_docs_exist():
    # The pages name the files that hold each concept: a rename must update them. Paths are relative to the
    # repository root or to the package; a bare file name is found anywhere in the source.
    missing = sorted({f"docs/{page}: {path}"
                      for page, text in _docs_text().items()
                      for path in _SOURCE_PATH.findall(text)
                      if not _exists(path)})
    assert not missing, "files named in docs/ that do not exist:\n" + "\n".join(missing)


def test_api_names_in_docs_exist():
    import loranull_kernels as lk

    missing = []
    for page, text in _docs_text().items():
        for name in sorted(set(_API_NAME.findall(text))):
            obj = lk
            try:
                for part in name.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"docs/{page}: lk.{name}")
    assert not missing, "public names used in docs/ that the package does not have:\n" + "\n".join(missing)
