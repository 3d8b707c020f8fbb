"""Render every results/*.json into benchmarks/README.md (one section per benchmark).

python -m benchmarks.report
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table

HEADER = """# Benchmarks

Each section is one script's latest run on the machine named in it, with the exact command.
Re-run a script, then `python -m benchmarks.report` to refresh this page. Numbers are what the
run measured; nothing here is tuned for the table.
"""


def main() -> None:
    sections = [HEADER]
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        m = result["machine"]
        sections.append(
            f"## {result['benchmark']}\n\n"
            f"`{result['command']}` "
            f"on {m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, {result['date']}\n\n"
            + (f"{result['notes']}\n\n" if result.get("notes") else "")
            + markdown_table(result["rows"])
            + "\n"
        )
    (Path(__file__).parent / "README.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
