"""The documentation: the key table is the one the config's comments write, and every link leads somewhere."""

import re
from pathlib import Path

import pytest

from fedclinic.config import DEFAULTS
from fedclinic.config.keys import keys_table, table_in, with_table

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_key_table_in_the_docs_is_the_one_the_config_comments_write():
    # Prepare
    doc = (ROOT / "docs" / "configuration.md").read_text()
    # Execute
    written = table_in(doc)
    # Assert: run `python -m fedclinic.config.keys --write docs/configuration.md` when this fails
    assert written == keys_table()


def test_every_key_has_one_row_with_its_default():
    # Prepare
    rows = table_in((ROOT / "docs" / "configuration.md").read_text()).splitlines()[2:]
    # Execute
    keys = [row.split("`")[1] for row in rows]
    # Assert
    assert keys == list(DEFAULTS)
    assert "| `privacy.target-epsilon` | `8.0` | each site's record-level epsilon" in "\n".join(rows)
    assert "| `output.quiet` | `false` |" in "\n".join(rows)


def test_writing_the_table_again_keeps_the_words_around_it():
    # Prepare
    doc = "# Keys\n\nbefore\n\n<!-- keys:start -->\nold table\n<!-- keys:end -->\n\nafter\n"
    # Execute
    written = with_table(doc)
    # Assert
    assert written.startswith("# Keys\n\nbefore\n\n<!-- keys:start -->\n| key | default | meaning |")
    assert written.endswith("<!-- keys:end -->\n\nafter\n") and "old table" not in written
    assert with_table(written) == written


def test_a_document_without_the_markers_is_refused():
    with pytest.raises(ValueError, match="keys:start"):
        with_table("# Keys\n")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_names_a_file_and_heading_that_exist(page):
    # Prepare
    text = page.read_text()
    # Execute: [words](target) outside code, where the target is not a web address
    targets = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S))
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    # Assert
    broken = []
    for target in local:
        path, _, anchor = target.partition("#")
        found = (page.parent / path).resolve() if path else page
        if not found.is_file():
            broken.append(target)
        elif anchor and anchor not in _anchors(found.read_text()):
            broken.append(target)
    assert broken == []


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_outputs_page_names_every_key_of_the_results_schema():
    from fedclinic.report.schema import schema_keys

    # Prepare: the page's results.json section
    doc = (ROOT / "docs" / "outputs.md").read_text()
    section = doc[doc.index("## `results.json`"):]
    # Execute
    missing = [f"{cls}.{key}" for cls, keys in schema_keys().items() for key in keys if f"`{key}`" not in section]
    # Assert
    assert missing == []
