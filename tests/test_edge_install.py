"""The edge install has no torch: `import wisp_sdk` and every public module of it must work without it.

A fresh interpreter gets a meta-path finder that refuses the heavy packages (and wisp_cloud), as if they were not
installed, then imports wisp_sdk, every public submodule (found with pkgutil, so new modules are covered
automatically), touches every public name, and runs the light CLI paths (`wisp --help`, `wisp models list`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

BLOCKED = ("torch", "transformers", "optimum", "accelerate", "gguf", "wisp_cloud", "safetensors")

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: edge install has no torch)")
            return None

    sys.meta_path.insert(0, Block())

    import wisp_sdk

    names = ["wisp_sdk"]
    for info in pkgutil.walk_packages(wisp_sdk.__path__, "wisp_sdk."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        names.append(info.name)
    for name in names:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", None) or [a for a in dir(mod) if not a.startswith("_")]:
            getattr(mod, attr)

    # wisp_sdk itself must not need wisp_cloud; the `wisp` dispatcher may import the (light) cli modules of every
    # package of the distribution, so for the CLI only the heavy third-party packages stay blocked.
    BLOCKED.discard("wisp_cloud")
    from wisp_sdk.cli import main
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    assert main(["models", "list"]) == 0

    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not heavy, heavy
    print("IMPORTED", len(names), " ".join(names))
    """
)


def test_wisp_sdk_imports_without_torch(tmp_path):
    env = dict(os.environ, WISP_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED"))
    imported = line.split()[2:]
    assert "wisp_sdk.bundle" in imported and "wisp_sdk.cli" in imported


def test_export_cli_modules_are_light(tmp_path):
    """`wisp export --help` must not import torch either (it lists choices from wisp_export.quantize)."""
    code = (
        "import sys\n"
        "from wisp_sdk.cli import main\n"
        "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--quant" in proc.stdout


def test_commands_that_need_an_extra_say_which_before_any_download(tmp_path, tiny_target):
    """An edge install (no torch): `wisp models fetch` says which extra to install instead of downloading
    491 MB first, and any command that meets a missing extra says so in one line, no traceback."""
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(BLOCKED) - {"wisp_cloud"}!r}:  # wisp_cloud ships; torch does not
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        from wisp_sdk.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    env = {**os.environ, "WISP_HOME": str(tmp_path)}
    t0 = time.monotonic()
    fetch = subprocess.run(
        [sys.executable, "-c", script, "models", "fetch", "qwen2.5-coder-0.5b-instruct"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert fetch.returncode == 2 and "pip install 'wisp[export]'" in fetch.stderr, fetch.stderr[-2000:]
    assert "Traceback" not in fetch.stderr and time.monotonic() - t0 < 60
    assert not any(tmp_path.rglob("*.bin"))  # nothing was downloaded
    serve = subprocess.run(
        [sys.executable, "-c", script, "serve", "--target", str(tiny_target)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert (
        serve.returncode == 2 and "pip install 'wisp[" in serve.stderr and "Traceback" not in serve.stderr
    ), serve.stderr[-2000:]
