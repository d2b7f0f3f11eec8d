"""MkDocs hook: pages are sections of README.md (one source of truth for the guide).

A page holding ``--8<-- "README.md:<name>"`` gets the README text between ``--8<-- [start:<name>]`` and
``--8<-- [end:<name>]``. Paths relative to the repository root are rewritten for the site (the PNGs under
``benchmarks/results/`` are published under ``results/``), and ``#anchor`` links to a heading that landed on another
page point at that page, so ``mkdocs build --strict`` can check every link.
"""

from __future__ import annotations

import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r'^--8<-- "README\.md:(\w+)"$', flags=re.M)
#: Repository folders whose images the README shows, and where they are in the site.
IMAGE_DIRS = {"benchmarks/results/": "results/", "docs/": ""}


def _sections() -> dict:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"--8<-- \[start:(\w+)\] -->\n(.*?)\n<!-- --8<-- \[end:\1\]", text, flags=re.S)
    return dict(found)


def _anchor_pages(config) -> dict:
    """Heading slug -> the page that includes it."""
    sections = _sections()
    pages = {}
    for md in Path(config["docs_dir"]).glob("*.md"):
        for name in INCLUDE.findall(md.read_text()):
            for heading in re.findall(r"^#+ (.+)$", sections.get(name, ""), flags=re.M):
                pages[slugify(heading, "-")] = md.name
    return pages


def on_files(files, config):
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File(f"results/{png.name}", str(png.parent.parent), config["site_dir"], False))
    return files


def on_page_markdown(markdown, page, config, files):
    sections = _sections()

    def include(match):
        name = match.group(1)
        if name not in sections:
            raise KeyError(f"README.md has no section {name!r} (markers --8<-- [start:{name}] / [end:{name}])")
        return sections[name]

    markdown = INCLUDE.sub(include, markdown)
    for repo_dir, site_dir in IMAGE_DIRS.items():
        markdown = markdown.replace(f"]({repo_dir}", f"]({site_dir}")
    pages = _anchor_pages(config)

    def anchor(match):
        target = pages.get(match.group(1))
        return f"]({target}#{match.group(1)})" if target and target != page.file.src_path else match.group(0)

    return re.sub(r"\]\(#([\w-]+)\)", anchor, markdown)
