"""Rewrite pyproject.toml's [tool.flwr.app.config] from fl_compams.config.schema() (the one source of defaults).

Run after adding or changing a key: ``.venv/bin/python scripts/sync_config.py``. A test fails if they differ.
"""

import re
from pathlib import Path

from fl_compams.config import schema


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def main() -> None:
    """Rewrite the section in place."""
    keys = schema()
    width = max(len(k.name) for k in keys) + 16
    block = "".join(f"{k.name} = {_toml(k.default)}".ljust(width) + f"# {k.help}\n" for k in keys)
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = path.read_text()
    new, n = re.subn(
        r"(\[tool\.flwr\.app\.config\]\n).*?(\n\[)",
        lambda m: m.group(1) + block + m.group(2),
        text,
        flags=re.S,
    )
    if n != 1:
        raise SystemExit("pyproject.toml has no [tool.flwr.app.config] section followed by another table")
    path.write_text(new)


if __name__ == "__main__":
    main()
