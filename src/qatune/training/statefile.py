"""A training state stored without pickle: its tensors in a safetensors file, everything else as JSON.

A checkpoint's state is a tree of dicts, lists and tuples whose leaves are numbers, strings, booleans, None,
tensors (optimizer moments, torch's RNG state) and numpy arrays (numpy's RNG state). `encode` turns it into JSON
plus a flat `{key: tensor}` dict; `decode` turns them back into the same tree, with the same Python types (tuples
stay tuples, integer dict keys stay integers), so `optimizer.load_state_dict`, `random.setstate` and
`np.random.set_state` accept it and a resumed run continues bit for bit. Reading either file can only produce
data: neither format can run code, unlike `torch.load(weights_only=False)` on a crafted pickle.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qatune.training.state import TrainState

# Markers of the JSON encoding; a plain dict whose keys include one of them is stored as a list of items.
_TENSOR, _NDARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _NDARRAY, _TUPLE, _ITEMS}


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-compatible data; its tensors are moved into `tensors` (CPU, contiguous) and referenced."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not _MARKERS & set(obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {_ITEMS: [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's state")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _NDARRAY in obj:
        return np.array(obj[_NDARRAY], dtype=np.dtype(obj["dtype"]))
    if _TUPLE in obj:
        return tuple(decode(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def save_state(state: dict[str, Any], json_path: Path, tensors_path: Path, *, after_tensors=None) -> None:
    """Write `state` as `tensors_path` (safetensors) and `json_path`; `after_tensors()` runs in between."""
    tensors: dict[str, torch.Tensor] = {}
    data = encode(state, tensors)
    save_file(tensors, str(tensors_path), metadata={"format": "pt"})
    if after_tensors is not None:
        after_tensors()
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()


def load_state(json_path: Path, tensors_path: Path) -> dict[str, Any]:
    """The state `save_state` wrote, checked to have a checkpoint's structure (`state_problem`): a state.json
    that is not UTF-8, not JSON, refers to missing tensors or lacks a key is one `ValueError` naming it."""
    tensors = load_file(str(tensors_path))
    try:
        state = decode(json.loads(json_path.read_bytes().decode("utf-8")), tensors)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
        raise ValueError(f"{json_path.name} is not a checkpoint state ({type(e).__name__}: {e})") from None
    problem = state_problem(state)
    if problem is not None:
        raise ValueError(f"{json_path.name}: {problem}")
    return state


# What a resume reads from a checkpoint's state, and of which type (`train_state` is checked field by field).
_STATE_KEYS: dict[str, Any] = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict,
                               "train_state": dict, "config": dict, "metrics_records": int, "step": int}
_RNG_KEYS: dict[str, Any] = {"python": tuple, "numpy": tuple, "torch": torch.Tensor}


def state_problem(state: Any) -> str | None:
    """What is wrong with the structure of a checkpoint's state (None when a resume can use it): a missing key
    or a value of the wrong type, named, checked before any of it reaches the optimizer or the RNGs."""
    if not isinstance(state, dict):
        return f"the state is a {type(state).__name__}, not a mapping"
    problem = _keys_problem(state, _STATE_KEYS, "") or _keys_problem(state["rng"], _RNG_KEYS, "rng.")
    if problem is not None:
        return problem
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list) \
            or not all(isinstance(g, dict) for g in optimizer["param_groups"]):
        return "optimizer is not an optimizer state (state, param_groups)"
    return _keys_problem(state["train_state"], _train_state_types(), "train_state.")


def _train_state_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainState)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainState) if f.metadata.get("persist", True)}


def _keys_problem(mapping: dict[str, Any], types_: dict[str, Any], prefix: str) -> str | None:
    for key, hint in types_.items():
        if key not in mapping:
            return f"{prefix}{key} is missing"
        if not _is_a(mapping[key], hint):
            return f"{prefix}{key} is {mapping[key]!r:.60}, not {getattr(hint, '__name__', hint)}"
    return None


def _is_a(value: Any, hint: Any) -> bool:
    """isinstance for the annotations of a state: unions, generics (their origin), a float that may be an int;
    a bool is no number here."""
    if isinstance(hint, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)
