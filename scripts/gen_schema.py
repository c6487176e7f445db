#!/usr/bin/env python3
"""Write docs/protocol.schema.json from the pydantic models in wisp_sdk.protocol (the single source of truth).

python scripts/gen_schema.py          # regenerate
python scripts/gen_schema.py --check  # exit 1 if the committed file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol.schema.json"


def render() -> str:
    from wisp_sdk.protocol import json_schema

    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that the file is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.is_file() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is out of date: run scripts/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
