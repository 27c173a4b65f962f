"""Print pip constraints that pin every declared dependency to its declared minimum (`pkg>=X` -> `pkg==X`).

CI installs qatune with these constraints into a second venv and runs the fast tests there, so the minimum
versions in pyproject.toml are tested, not assumed. Reads `[project] dependencies` and the `hf` extra (peft is
the optional backend and the adapter-interop reference); the test tools float.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

EXTRAS = ("hf",)


def floors(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req.strip())
        if match is None:
            sys.exit(f"{pyproject}: every dependency needs a `>=` floor that CI can test; got {req!r}")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml")))
