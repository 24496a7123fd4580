"""MkDocs hooks (``hooks:`` in mkdocs.yml).

The site serves the benchmark results and notes from where they are committed, ``benchmarks/``, without copies of
them in ``docs/``.

A docs page links them as ``../benchmarks/results/<file>`` and ``../benchmarks/NOTES.md``, which GitHub resolves
from ``docs/``. MkDocs serves only what lies inside ``docs/``, so this hook adds those files to the site (every
file of ``benchmarks/results/`` under ``results/``, the notes as the page ``benchmark-notes.md``) and points the
links there. A link to a file that does not exist stays a link to a missing file, which ``mkdocs build --strict``
refuses as it refuses any broken link: a renamed plot cannot go unnoticed.

The docstrings cross-reference with Sphinx roles (``:func:`inject```), which the API reference would print as
they are; the role is dropped and the name kept as code.
"""
from __future__ import annotations

import re
from pathlib import Path

# Repository path (relative to the folder of mkdocs.yml, the repository root) -> where the site serves it,
# relative to docs/. A folder maps to a folder.
SERVED = {
    "benchmarks/results/": "results/",
    "benchmarks/NOTES.md": "benchmark-notes.md",
}


# A Sphinx role before the <code> that Markdown made of its backquoted target, and the "~" that would shorten it.
_SPHINX_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):(<code>)~?")


def on_files(files, config):
    from mkdocs.structure.files import File  # here, so that the tests read SERVED without mkdocs installed

    root = Path(config["config_file_path"]).parent
    for source, target in SERVED.items():
        paths = sorted(p for p in (root / source).iterdir() if p.is_file()) if source.endswith("/") else [root / source]
        for path in paths:
            uri = target + path.name if target.endswith("/") else target
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    # A page n folders below docs/ reaches the repository root with n + 1 "../", and docs/ itself with n.
    depth = page.file.src_uri.count("/")
    for source, target in SERVED.items():
        markdown = markdown.replace(f"]({'../' * (depth + 1)}{source}", f"]({'../' * depth}{target}")
    return markdown


def on_page_content(html, page, config, files):
    return _SPHINX_ROLE.sub(r"\1", html)
