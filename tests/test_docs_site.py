"""The docs site as a reader sees it: no raw Sphinx roles, examples as code, no unexplained ``../shared`` paths."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sphinx_roles_become_code_linked_to_the_entry():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = (
        '<h2 id="dsm_lightning.apply_dsm">apply_dsm</h2><h2 id="dsm_lightning.DSMConfig">DSMConfig</h2>'
        "<p>see :func:<code>apply_dsm</code>, :class:<code>~dsm_lightning.DSMConfig</code>, "
        ":attr:<code>DSMConfig.delay &lt;dsm_lightning.DSMConfig&gt;</code> and :func:<code>other.thing()</code></p>"
    )
    out = hooks.on_page_content(html, None, None, None)
    assert not re.search(r":(func|class|attr):", out)
    assert '<a href="#dsm_lightning.apply_dsm"><code>apply_dsm</code></a>' in out
    assert '<a href="#dsm_lightning.DSMConfig"><code>DSMConfig</code></a>' in out
    assert '<a href="#dsm_lightning.DSMConfig"><code>DSMConfig.delay</code></a>' in out
    assert "<code>other.thing()</code>" in out


def test_docs_pages_explain_every_path_outside_the_repository():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for line in page.read_text().splitlines():
            if "../shared" in line:
                assert page.name == "benchmarks.md" and "a folder `../shared/`" in line, f"{page.name}: {line}"


@pytest.mark.slow
def test_api_page_has_no_raw_roles_and_renders_examples_as_code(tmp_path):
    pytest.importorskip("mkdocstrings")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)], cwd=ROOT, check=True
    )
    api = (tmp_path / "api" / "index.html").read_text()
    assert not re.findall(r":(?:func|class|meth|attr|data|exc|mod):", api)
    assert '<span class="gp">&gt;&gt;&gt; </span><span class="kn">import</span>' in api, "doctest examples are code"
