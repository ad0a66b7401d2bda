"""The JSON Schema of rulebook files (format version 2), shipped with the package.

``rulebook.schema.json`` gives editors that read JSON Schema (yaml-language-server, and
through it VS Code's YAML extension) completion, hover help and validation while a rulebook
is written by hand. A book names it in its first line, the modeline::

    # yaml-language-server: $schema=../../rulecheck/schemas/rulebook.schema.json

yaml-language-server resolves a relative ``$schema`` path against the directory of the YAML
file (``path.resolve`` of the file's directory and the path), takes a path it sees as
absolute as a file path, and passes ``file:`` and ``http...`` values through as URIs; the
value ends at the first whitespace and a ``#`` starts a fragment. :func:`modeline` writes a
relative path where those rules read it back as this file, and a file URI otherwise.

The schema is JSON Schema 2020-12 written with the keywords that draft-07 reads the same way
(editors that validate as draft-07, as yaml-language-server did until it read 2019-09 and
2020-12, see the same schema): no ``prefixItems`` (a skip-gram pair is ``items`` with
``minItems`` and ``maxItems`` 2), no ``unevaluatedProperties``, and nothing but a description
beside a ``$ref``. It describes the format; rulecheck's own reader (``rulecheck.rulebook``) is
what decides, and checks more than a schema can (see the schema's description).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

SCHEMA_FILE: Path = Path(os.path.abspath(__file__)).with_name("rulebook.schema.json")
MODELINE_PREFIX = "# yaml-language-server: $schema="


def modeline(book_path: Path) -> str:
    """The first line that points editors at :data:`SCHEMA_FILE` from the rulebook at
    ``book_path``: the schema's path relative to the book's directory, with ``/``
    separators, when there is one that yaml-language-server reads back as the schema;
    else (another drive, or a path with whitespace or ``#``) its absolute ``file://`` URI.
    Both paths are made absolute without resolving symbolic links: the editor takes ``..``
    in the path lexically too."""
    schema = os.path.abspath(SCHEMA_FILE)
    book_dir = os.path.dirname(os.path.abspath(book_path))
    try:
        relative = PurePath(os.path.relpath(schema, book_dir)).as_posix()
    except ValueError:  # Windows: on another drive than the book
        relative = None
    if relative is None or any(c.isspace() or c == "#" for c in relative):
        return MODELINE_PREFIX + Path(schema).as_uri()
    if relative.startswith(("file:", "http")):  # would be read as a URI
        relative = "./" + relative
    return MODELINE_PREFIX + relative
