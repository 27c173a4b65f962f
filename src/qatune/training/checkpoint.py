"""Training checkpoints: written atomically, verified before use, never pickled; complete enough to resume
bit-for-bit.

Layout under `RUN/checkpoints/`:
    step-000120/            one directory per checkpoint
        weights.safetensors   the trainable parameters (LoRA weights, or the whole model for full fine-tuning)
        state.safetensors     the state's tensors: optimizer moments, torch RNG states
        state.json            the rest: scheduler, scaler, Python/numpy RNG, data position, counters, the config
        manifest.json         written last: the size and SHA-256 of each file above
    last -> step-000120     symlinks, replaced atomically
    best -> step-000080

Writing: the files go to a temporary directory, the manifest last, and the directory is renamed into place only
when complete; then `last`/`best` are swapped with `os.replace` and old checkpoints rotated. A kill at any moment
leaves the previous checkpoints intact (`tests/test_reliability.py` kills at each of these points).

Reading: `load_resumable` (`find_resumable` without loading) takes the newest checkpoint whose files match its
manifest and whose state.json has a checkpoint state's structure (`statefile.state_problem`), and names each
newer one it had to skip; it never deletes anything and does not trust `last` (a dangling link is no reason to
start over).
Nothing here unpickles: a crafted checkpoint can hold wrong numbers, never code (`statefile.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qatune.data.readers import DATA_ALIASES, resolve_data
from qatune.errors import ModelError
from qatune.lora.initial import initial_state, is_initial_key, restore_initial
from qatune.lora.inject import lora_layers
from qatune.training.statefile import load_state, save_state
from qatune.utils.faults import fault_point
from qatune.utils.io import fsync_dir, fsync_tree, scratch_beside, sha256_file, swap_dir_in

FORMAT = 2  # 1: state.pt (a pickle), no manifest -- no longer read
WEIGHTS, STATE_TENSORS, STATE_JSON, MANIFEST = "weights.safetensors", "state.safetensors", "state.json", "manifest.json"
_STEP_DIR = re.compile(r"step-(\d+)")
logger = logging.getLogger(__name__)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (tied ones once), detached on CPU; with PiSSA/OLoRA also the LoRA pairs' starting
    values (`lora.initial`), which the result is converted against and a resume trains on."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return state | initial_state(lora_layers(model))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_identity(train: str | None, val: str | None) -> dict[str, dict[str, Any]]:
    """What a checkpoint records of its data, so that a resume can tell it changed: for data.train and data.val,
    each local file's size and SHA-256 (every file of a directory); the shipped `sample` sets and hub datasets
    (`hf:NAME`, whose revision is part of the name) by name."""
    found = {}
    for key, source in (("data.train", train), ("data.val", val)):
        if source is None:
            continue
        path = Path(resolve_data(source))
        if str(source) in DATA_ALIASES or not path.exists():
            found[key] = {"name": str(source)}
            continue
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        found[key] = {"name": str(source), "files": {str(f): _content_id(f, *_stat_key(f)) for f in files}}
    return found


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _content_id(path: Path, size: int, mtime_ns: int) -> dict[str, Any]:
    """Size and SHA-256, hashed once per (file, size, mtime): every checkpoint of a run records them."""
    return {"bytes": size, "sha256": sha256_file(path)}


def data_changes(recorded: dict[str, dict[str, Any]] | None, now: dict[str, dict[str, Any]]) -> list[str]:
    """How the data files differ from what a checkpoint recorded (nothing for a checkpoint that recorded none)."""
    changes = []
    for key, before in (recorded or {}).items():
        after = now.get(key, {})
        if before.get("name") != after.get("name"):
            continue  # a changed data.train/data.val is a config change, refused as such
        old, new = before.get("files", {}), after.get("files", {})
        for name in sorted(old.keys() | new.keys()):
            a, b = old.get(name), new.get(name)
            if a is None or b is None:
                changes.append(f"{key} {name}: {'added' if a is None else 'removed'} since the checkpoint")
            elif a["bytes"] != b["bytes"]:
                changes.append(f"{key} {name}: {a['bytes']} bytes at the checkpoint, {b['bytes']} now")
            elif a["sha256"] != b["sha256"]:
                changes.append(f"{key} {name}: its content changed (SHA-256) since the checkpoint")
    return changes


def step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint directories under `root`, oldest first (links and temporaries excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=step_of)


# ----------------------------------------------------------------------------------------------------- writing


def write_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any], *,
                    best: bool, keep: int) -> Path:
    """Write `root/step-NNNNNN` atomically, point `last` (and `best` when `best`) at it, rotate old ones.

    A write that fails (disk full) raises one `StorageError` naming the file and leaves every earlier checkpoint
    as it was."""
    name = f"step-{step:06d}"
    final = root / name
    with scratch_beside(final, directory=True) as tmp:
        _remove_leftovers(root, keep=tmp)
        _write_files(tmp, step, weights, {**state, "rng": rng_state(), "step": step})
        _swap_in(tmp, final)
        point(root, "last", name)
        fault_point("last-linked")
        if best:
            point(root, "best", name)
            fault_point("best-linked")
        fsync_dir(root)
        _rotate(root, keep, step)
        fault_point("rotated")
    return final


def _write_files(tmp: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    save_file(weights, str(tmp / WEIGHTS))
    fault_point("weights-written")
    save_state(state, tmp / STATE_JSON, tmp / STATE_TENSORS, after_tensors=lambda: fault_point("tensors-written"))
    fault_point("state-written")
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    fsync_tree(tmp)
    fault_point("manifest-written")


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place. A same-named one (a stale checkpoint from a run that resumed
    from an earlier step) is set aside first; a kill in between leaves the earlier checkpoints to resume from."""
    aside = swap_dir_in(tmp, final, aside_fault="old-set-aside")
    fault_point("renamed")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def point(root: Path, link_name: str, target_name: str) -> None:
    """Make `root/link_name` a symlink to `target_name` (relative), atomically."""
    link = root / link_name
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


def _remove_leftovers(root: Path, keep: Path) -> None:
    """Temporary and set-aside directories of writes that a kill interrupted (only the lock holder writes here,
    so none of them but `keep`, the write now under way, is in use)."""
    for p in root.iterdir():
        if p != keep and p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _rotate(root: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`, and whatever `last` and `best` point at. Checkpoints past
    `step` (left by a run that resumed from an earlier one) are not counted; they are replaced when reached."""
    protected = {os.path.realpath(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    done = [p for p in step_dirs(root) if step_of(p) <= step]
    for p in done[: max(len(done) - keep, 0)]:
        if os.path.realpath(p) not in protected:
            shutil.rmtree(p)


# ----------------------------------------------------------------------------------------------------- reading


def verify(path: Path, *, hashes: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be used (missing or damaged files), or None when it is intact.
    `hashes=False` checks the sizes only (for a checkpoint already verified, or written, by this process)."""
    if not (path / MANIFEST).is_file():
        if (path / "state.pt").is_file():
            return ("written by an older qatune (state.pt, a pickle), which is not loaded because unpickling can "
                    "run code")
        return f"no {MANIFEST} (it is written last: the checkpoint is incomplete)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != {WEIGHTS, STATE_TENSORS, STATE_JSON}:
            return f"{MANIFEST} is not a format-{FORMAT} checkpoint manifest"
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, its manifest says {meta['bytes']}"
            if hashes and sha256_file(f) != meta["sha256"]:
                return f"{name} does not match its SHA-256 in {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    return None


def load_resumable(root: Path) -> tuple[Path | None, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The newest checkpoint under `root` that is intact and readable: (its path, weights, state), and one note
    per newer checkpoint skipped, because its files do not match its manifest or its state cannot be read (a
    state.json edited and its manifest rewritten). (None, {}, {}, notes) when there is none."""
    skipped = []
    for path in reversed(step_dirs(root)):
        problem = verify(path)
        if problem is None:
            try:
                return path, *_read(path), skipped
            except ModelError as e:
                problem = str(e)
        skipped.append(f"{path.name}: {problem}")
    return None, {}, {}, skipped


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under `root` (None if there is none), and one note per newer checkpoint
    skipped because it is damaged."""
    skipped = []
    for path in reversed(step_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def relink(root: Path, resumed: Path, best_step: int | None) -> list[str]:
    """Point `last` at the checkpoint a run resumes from and `best` at its state's best step: a kill between the
    two link swaps of a save, or a damaged newer checkpoint, can leave them elsewhere. Returns warnings."""
    point(root, "last", resumed.name)
    if best_step is None:
        if (root / "best").is_symlink():  # a best of steps that are being redone
            (root / "best").unlink()
        return []
    best = root / f"step-{best_step:06d}"
    problem = "missing" if not best.is_dir() else None if best == resumed else verify(best)
    if problem is None:
        point(root, "best", best.name)
        return []
    if (root / "best").is_symlink():
        (root / "best").unlink()
    return [f"the best checkpoint so far, {best.name}, cannot be used ({problem}): the result will be the best "
            "checkpoint of the evaluations still to come, or the last one"]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, training state) of a checkpoint directory, verified against its manifest first."""
    problem = verify(path)
    if problem is not None:
        raise ModelError(f"checkpoint {path} cannot be used: {problem}")
    try:
        return _read(path)
    except ModelError as e:
        raise ModelError(f"checkpoint {path} cannot be read: {e}") from None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        return load_file(str(path / WEIGHTS)), load_state(path / STATE_JSON, path / STATE_TENSORS)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # intact files that are not ours
        raise ModelError(str(e)) from None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint that this run wrote or verified when it resumed (the best one, for
    the result): its files' sizes are checked again, their hashes are not recomputed."""
    problem = verify(path, hashes=False)
    if problem is not None:
        raise ModelError(f"checkpoint {path} cannot be used: {problem}")
    try:
        return load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise ModelError(f"checkpoint {path} cannot be read: {e}") from e


def load_trainable(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    initial = {k: v for k, v in weights.items() if is_initial_key(k)}
    weights = {k: v for k, v in weights.items() if k not in initial}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ModelError(f"checkpoint {where} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    mismatched = [f"{n} {tuple(weights[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
                  if weights[n].shape != p.shape]
    if mismatched:
        raise ModelError(f"checkpoint {where} does not fit this model: shapes differ ({', '.join(mismatched[:3])})")
    for note in restore_initial(lora_layers(model), initial, where):  # PiSSA/OLoRA: the run's residual base
        logger.warning(note)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


def latest(root: Path, which: str = "last") -> Path | None:
    link = root / which
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None
