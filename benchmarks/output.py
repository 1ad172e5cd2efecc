"""Where benchmarks put their results: JSON records plus a markdown table next to them."""

from __future__ import annotations

import json
import os


def write_results(out: str, records: list, table: str) -> None:
    """Write `records` to `out` (JSON) and `table` to the same path with .md; print both places."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(records, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"json: {os.path.abspath(out)}")
