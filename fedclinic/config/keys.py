"""The configuration keys as a markdown table, written from the comment above each field of sections.py.

    python -m fedclinic.config.keys                                  # print the table
    python -m fedclinic.config.keys --write docs/configuration.md    # replace the table between its markers

docs/configuration.md holds the table between START and END; tests/test_docs.py fails when it
differs from what this module writes, so a field's comment is its one documentation.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import fields
from pathlib import Path

from fedclinic.config import DEFAULTS, Config

START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment lines just above the field, joined}, read from the class's source."""
    lines, _ = inspect.getsourcelines(cls)
    body = ast.parse("".join(lines)).body[0].body
    comments = {}
    for node in (n for n in body if isinstance(n, ast.AnnAssign)):
        above, i = [], node.lineno - 2  # linenos count from 1, so lines[lineno - 2] is the line above
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        comments[node.target.id] = " ".join(above)
    return comments


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML and --set write it
    return '""' if value == "" else str(value)


def keys_table() -> str:
    """key | default | meaning, one row per key of DEFAULTS, in the order of the dataclasses."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in fields(Config):
        part = section.default_factory  # type: ignore[misc]
        comments = field_comments(part)
        for f in fields(part):
            key = f"{section.name}.{f.name.replace('_', '-')}"
            if not comments.get(f.name):
                raise ValueError(f"{part.__name__}.{f.name} ({key}) has no comment above it to document it")
            meaning = comments[f.name].replace("|", r"\|")  # a bar would end the cell
            rows.append(f"| `{key}` | `{_default(DEFAULTS[key])}` | {meaning} |")
    return "\n".join(rows) + "\n"


def table_in(text: str) -> str:
    """The table between START and END of a document."""
    if START not in text or END not in text:
        raise ValueError(f"the document has no {START} ... {END} markers")
    return text[text.index(START) + len(START):text.index(END)].strip("\n") + "\n"


def with_table(text: str) -> str:
    """The document with the table between START and END written again."""
    table_in(text)  # refuses a document without the markers
    head, tail = text[:text.index(START) + len(START)], text[text.index(END):]
    return f"{head}\n{keys_table()}{tail}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(with_table(path.read_text()))
        return 0
    if argv:
        print("usage: python -m fedclinic.config.keys [--write FILE.md]", file=sys.stderr)
        return 2
    sys.stdout.write(keys_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
