"""A training state stored without pickle: its tensors in a safetensors file, everything else as JSON.

A checkpoint's state is a tree of dicts, lists and tuples whose leaves are numbers, strings, booleans, None,
tensors (optimizer moments, torch's RNG state) and numpy arrays (numpy's RNG state). `encode` turns it into JSON
plus a flat `{key: tensor}` dict; `decode` turns them back into the same tree, with the same Python types (tuples
stay tuples, integer dict keys stay integers), so `optimizer.load_state_dict`, `random.setstate` and
`np.random.set_state` accept it and a resumed run continues bit for bit. Reading either file can only produce
data: neither format can run code, unlike `torch.load(weights_only=False)` on a crafted pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
    """The state `save_state` wrote."""
    tensors = load_file(str(tensors_path))
    return decode(json.loads(json_path.read_text(encoding="utf-8")), tensors)
