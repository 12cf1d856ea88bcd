"""Real prose shipped with the package (public domain), for perplexity and retrieval tests."""

from __future__ import annotations

from importlib import resources

TEXTS = {"prideprejudice": "prideprejudice.txt"}


def load_text(name: str = "prideprejudice") -> str:
    """The full text of a shipped public-domain book (Jane Austen's *Pride and Prejudice*)."""
    try:
        fname = TEXTS[name]
    except KeyError:
        raise ValueError(f"unknown text {name!r}; shipped texts: {sorted(TEXTS)}") from None
    return resources.files("infertrix.data").joinpath(fname).read_text(encoding="utf-8")


def body_text(name: str = "prideprejudice") -> str:
    """The text without its title lines, paragraphs joined by single blank lines."""
    text = load_text(name)
    start = text.find("Chapter 1")
    return text[start:] if start >= 0 else text
