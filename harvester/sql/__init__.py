"""Named SQL queries kept in ``.sql`` files beside this module, each query starting with ``-- name: NAME``."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources


@cache
def queries(file: str) -> dict[str, str]:
    """The queries of ``<file>.sql`` by name, loaded once."""
    text = resources.files(__package__).joinpath(f"{file}.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2])}
