"""Fail with a clear message when a lock in locks/ no longer satisfies what it was made from.

    .venv/bin/python scripts/check_locks.py

Each requirement of pyproject.toml (the core dependencies plus the extras a lock covers) and of
scripts/sglang/requirements-cpu.txt must be pinned in its lock at a version its specifier admits. A lock made before
a dependency was added, dropped from a range or re-pinned fails here; `bash scripts/lock.sh` rewrites it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
LOCKS: dict[str, tuple[str, ...]] = {
    "dev.txt": ("edge", "export", "cloud", "dev"),
    "edge.txt": ("edge",),
}
SGLANG_REQS = ROOT / "scripts" / "sglang" / "requirements-cpu.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path.relative_to(ROOT)}: not a pin: {line!r} (run bash scripts/lock.sh)")
        pins[canonical(name)] = Version(version.strip())
    return pins


def problems(lock: Path, requirements: list[str]) -> list[str]:
    if not lock.is_file():
        return [f"{lock.name} is missing"]
    pins = read_pins(lock)
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = pins.get(canonical(req.name))
        if have is None:
            out.append(f"{req.name} ({text}) is not in the lock")
        elif not req.specifier.contains(have, prereleases=True):
            out.append(f"{req.name} is locked at {have}, outside {text!r}")
    return out


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stale: list[str] = []
    for name, extras in LOCKS.items():
        reqs = list(project["dependencies"])
        for extra in extras:
            reqs += project["optional-dependencies"][extra]
        stale += [f"locks/{name}: {p}" for p in problems(ROOT / "locks" / name, reqs)]
    sglang = [s for line in SGLANG_REQS.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]
    stale += [f"locks/sglang.txt: {p}" for p in problems(ROOT / "locks" / "sglang.txt", sglang)]
    if stale:
        print(
            "check_locks: the locks do not match their sources; run `bash scripts/lock.sh` and commit locks/:",
            file=sys.stderr,
        )
        for line in stale:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"check_locks: {len(LOCKS) + 1} locks match pyproject.toml and scripts/sglang/requirements-cpu.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
