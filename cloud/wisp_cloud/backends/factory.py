"""Building a backend from the CLI's arguments: the one place `wisp serve`, `wisp profile` and the benchmarks choose
the native engine (paged on CUDA and for --random-config, the HF engine otherwise)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wisp_sdk.errors import WispError

from wisp_cloud.random_model import random_paged_backend


def device_arg(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N (checked at parse time: one line, exit 2)."""
    name, sep, index = text.partition(":")
    if (name == "cpu" and not sep) or (name == "cuda" and (not sep or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")


def check_device(device: str) -> None:
    """A CUDA device that this torch build and machine have, before any model is loaded."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise WispError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise WispError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def native_engine(args: argparse.Namespace) -> str:
    """`--engine auto`: paged on CUDA and for --random-config, the HF engine otherwise."""
    if args.engine != "auto":
        return args.engine
    return "paged" if args.device.startswith("cuda") or args.random_config else "hf"


def native_backend(args: argparse.Namespace, target: Path, kv_budget_tokens: int | None):
    """`--backend native` (`wisp serve`, `wisp profile`): the engine `native_engine` picks."""
    engine = native_engine(args)
    if args.random_config:
        if engine != "paged":
            raise WispError("--random-config runs on the paged engine (--engine paged)")
        return random_paged_backend(args, kv_budget_tokens)
    if engine == "paged":
        from wisp_cloud.backends.paged import PagedBackend

        return PagedBackend(target, device=args.device, dtype=args.dtype, kv_budget_tokens=kv_budget_tokens)
    from wisp_cloud.backends.native import NativeBackend

    return NativeBackend(target, device=args.device, dtype=args.dtype)


def capture_startup_graphs(
    backend: object, max_batch: int, max_q: int, max_context: int, budget_s: float
) -> int:
    """`wisp serve`: capture the paged engine's CUDA graphs for every decode and verify bucket the server's
    limits allow, before it takes sessions (no-op for other engines and on CPU). Returns graphs captured."""
    from wisp_cloud.backends.paged import PagedBackend

    if budget_s <= 0 or not isinstance(backend, PagedBackend) or not backend.cuda_graphs:
        return 0
    return backend.capture_graphs(backend.startup_keys(max_batch, max_q, max_context), budget_s)
