"""MkDocs hook: the home page is README.md; the other pages are written in docs/.

``docs/index.md`` holds ``--8<-- "README.md"`` and gets the README; any page may include a file of the repository
the same way (``--8<-- "benchmarks/results/matched_tome_clip.md"``: a table exactly as the benchmark wrote it, so
the page cannot drift from the results). Paths relative to the repository root are
rewritten for the site (the PNGs under ``benchmarks/results/`` are published under ``results/``, ``docs/x.md`` is
``x.md``), and ``#anchor`` links to a heading on another page point at that page, so ``mkdocs build --strict`` can
check every link. Sphinx roles left in docstrings (``:func:`apply_dsm```, ``:class:`~dsm_lightning.DSMConfig```)
are rendered as code, linked to the object's entry where the page has one.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', flags=re.M)
#: A Sphinx cross-reference role as it reaches the HTML: ``:func:`` followed by the backticked name, now code.
ROLE = re.compile(
    r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj):\s*<code>(~?)([\w.]+)(\(\))?(?:\s*&lt;~?([\w.]+)&gt;)?</code>"
)


def _included(text: str) -> str:
    """``text`` with every ``--8<-- "path"`` line replaced by that repository file's contents."""
    return INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text(), text)


#: Repository folders whose files the pages link to, and where they are in the site.
SITE_PATHS = {"benchmarks/results/": "results/", "docs/": ""}


def _anchor_pages(config) -> dict:
    """Heading slug -> the page that holds it."""
    pages = {}
    for md in Path(config["docs_dir"]).glob("*.md"):
        text = _included(md.read_text())
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
            pages.setdefault(slugify(heading, "-"), md.name)
    return pages


def on_files(files, config):
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File(f"results/{png.name}", str(png.parent.parent), config["site_dir"], False))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = _included(markdown)
    for repo_dir, site_dir in SITE_PATHS.items():
        markdown = markdown.replace(f"]({repo_dir}", f"]({site_dir}")
    # files of the repository outside the site: named, not linked
    markdown = re.sub(r"\[([^\]]+)\]\((?:CHANGELOG\.md|LICENSE|examples/[^)]*)\)", r"`\1`", markdown)
    pages = _anchor_pages(config)

    def anchor(match):
        target = pages.get(match.group(1))
        return f"]({target}#{match.group(1)})" if target and target != page.file.src_path else match.group(0)

    return re.sub(r"\]\(#([\w-]+)\)", anchor, markdown)


def on_page_content(html, page, config, files):
    """Sphinx roles (``:func:`x```) that mkdocstrings leaves as text become code, linked to ``x``'s entry (its
    ``id`` is the dotted path) when the page documents it; ``~`` shows only the last name, as Sphinx does."""
    ids = set(re.findall(r'id="([\w.]+)"', html))

    def resolve(name: str):
        if name in ids:
            return name
        ends = sorted(i for i in ids if i.endswith("." + name))
        return ends[0] if ends else None

    def role(match):
        short, name, call, explicit = match.group(1), match.group(2), match.group(3) or "", match.group(4)
        shown = (name.rsplit(".", 1)[-1] if short else name) + call
        target = resolve(explicit or name) or (resolve(name) if explicit else None)
        code = f"<code>{shown}</code>"
        return f'<a href="#{target}">{code}</a>' if target else code

    return ROLE.sub(role, html)
