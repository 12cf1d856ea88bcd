"""The docs' method tables follow the registry: every shipped transform is in its family's page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import infertrix as ix
from infertrix.core.registry import family_of

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = {"linear": "quant.md"}  # the float kernel swap is documented beside the quantized kernels


@pytest.mark.parametrize("name", sorted(n for n in ix.available() if not n.startswith("_")))
def test_every_shipped_transform_is_in_its_family_page(name):
    cls = ix.available()[name]
    family = family_of(cls)
    page = DOCS / PAGES.get(family, f"{family}.md")
    text = page.read_text()
    # a recipe in backticks: `name`, `name:value` or `name(...)`, under its name or an alias
    assert any(re.search(rf"`{re.escape(n)}[`:(]", text) for n in (cls.name, *cls.aliases)), (
        f"{name} is registered but {page.name} does not show its recipe; add it to the page's table"
    )
