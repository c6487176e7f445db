"""The `wisp` command line: one dispatcher, subcommands contributed by each package.

Each subcommand lives in a module with `add_parser(subparsers)`; that module must import only light things at
top level so that `wisp --help` and the edge-only install (no torch) stay fast and working.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from wisp_sdk.errors import WispError

# name -> module providing add_parser(subparsers). Order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "models": "wisp_export.cli_models",
    "export": "wisp_export.cli_export",
    "serve": "wisp_cloud.cli_serve",
    "cluster": "wisp_cloud.cli_cluster",
    "profile": "wisp_cloud.cli_profile",
    "generate": "wisp_sdk.cli_generate",
    "calibrate": "wisp_sdk.cli_calibrate",
    "edge": "wisp_sdk.cli_edge",
    "bench": "wisp_cloud.fleet.cli_bench",
    "simulate": "wisp_cloud.fleet.cli_simulate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wisp",
        description="WISP: distributed speculative LLM serving (edge drafts, cloud verifies).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    _show_defaults(parser)
    return parser


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is none to name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not _has_default(action) or "default" in text.lower():
            return action.help
        return f"{text} (default: %(default)s)"


def _has_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default not in (None, False, [], argparse.SUPPRESS)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's --help the defaults (subcommands are built in their own modules)."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if action.help is None and _has_default(action):
            action.help = "(default: %(default)s)"  # argparse prints no help line at all for help=None
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


# The package a missing import comes from -> the extra that installs it (an edge install has none of these).
_EXTRA_OF = {
    "torch": "cloud",
    "transformers": "cloud",
    "prometheus_client": "cloud",
    "safetensors": "cloud",
    "gguf": "export",
    "optimum": "export",
    "onnx": "export",
    "onnx_ir": "export",
    "accelerate": "export",
    "matplotlib": "dev",
    "scipy": "dev",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wisp")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except WispError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an extra this command needs is not installed
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"error: `wisp {args.command}` needs {exc.name!r}, which this install lacks: "
            f"pip install 'wisp[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
