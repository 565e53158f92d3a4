"""The project's own files: licence, citation metadata and changelog agree with the package."""
import os

import yaml

import gradmem_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_citation_cites_software_and_paper():
    cff = yaml.safe_load(read("CITATION.cff"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == gradmem_fast.__version__
    assert cff["license"] == "MIT" and read("LICENSE").startswith("MIT License")
    for key in ("title", "authors", "message"):
        assert cff[key]
    paper, = cff["references"]
    assert "GradMem" in paper["title"] and paper["year"] == 2026
    assert {"value": "arXiv:2603.13875"}.items() <= paper["identifiers"][0].items()
    assert all(author.get("family-names") for author in paper["authors"])


def test_changelog_names_this_version():
    text = read("CHANGELOG.md")
    assert f"## {gradmem_fast.__version__}" in text and "## Unreleased" in text
