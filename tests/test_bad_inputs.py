"""Bad inputs, one line each (issue 17, "nothing silently wrong"): tiny files built to exhaust memory, malformed
model and adapter configs, templates, paths, devices and test hooks. Each ends as exactly one `qatune: error:`
line naming the file, key or tensor, with exit status 2, never a traceback.

The memory bombs run in a child process under an address-space limit (`_bounded_cli`), so that a regression
fails the test (a MemoryError traceback, or the time limit) instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qatune.cli.commands import main
from qatune.data.prompts import ChatFormat, PromptTemplate
from qatune.data.readers import QAExample
from qatune.errors import ConfigError, DataError, ModelError
from qatune.lora.adapters import ADAPTER_CONFIG, load_adapter, save_adapter
from qatune.lora.inject import apply_lora
from qatune.lora.layer import LoRAConfig
from qatune.models.gguf_reader import open_gguf
from qatune.models.loading import load_base_model
from qatune.models.tokenizer import load_tokenizer
from qatune.utils.faults import FAULT_ENV

# Address space a bounded child may add to what it holds once qatune's CLI is imported (measured then, in the
# child: a CUDA build of torch maps gigabytes of libraries at import, a CPU build a few hundred megabytes).
MEMORY_LIMIT = 3 << 30


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def _refused(capsys, *argv: str) -> str:
    """`qatune ARGV` in this process must exit 2 with exactly one error line and no traceback; that line."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qatune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, err)
    return lines[0]


def _bounded_cli(*argv: str) -> str:
    """`qatune ARGV` in a child limited to `MEMORY_LIMIT` of address space and 5 minutes; like `_refused`, and
    the whole of stderr must be short: a refused bomb is never expanded into its message."""
    code = ("import re, resource, sys; from qatune.cli.commands import main; "
            "held = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024; "
            f"resource.setrlimit(resource.RLIMIT_AS, (held + {MEMORY_LIMIT}, held + {MEMORY_LIMIT})); "
            "sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               COLUMNS="1000")
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("qatune: error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, (
        done.returncode, done.stderr[-3000:])
    assert len(done.stderr) < 2000, done.stderr[:2000]
    return lines[0]


def _train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model={model}", "method=lora", "data.train=sample", "data.max_examples=8",
            "train.batch_size=4", "train.max_steps=1", "train.progress=false", f"out={out}", *extra]


# ------------------------------------------------------------------------------------- memory from tiny inputs


def _yaml_bomb(levels: int = 9) -> str:
    """"Billion laughs": `levels` lists of nine references to the previous one, 9**levels strings in all."""
    lists = ["&l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    lists += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(lists) + "]"


def test_a_yaml_alias_bomb_is_refused_unexpanded(qa_gpt2_dir, tmp_path):
    bomb = _yaml_bomb()
    assert len(bomb) < 1024
    config = tmp_path / "bomb.yaml"
    config.write_text(f"model: {bomb}\ndata:\n  train: sample\nout: {tmp_path / 'run'}\n")
    line = _bounded_cli("train", str(config))
    assert f"{config}:1:" in line and "alias *l0" in line and "anchors and aliases have no use" in line
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"models: [{qa_gpt2_dir}]\nseeds: {bomb}\neval: {{data: sample-test}}\n")
    line = _bounded_cli("compare", str(sweep), "--out", str(tmp_path / "sweep"))
    assert f"{sweep}:2:" in line and "alias" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_deep_nesting_and_nul_characters_in_yaml_are_refused(qa_gpt2_dir, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 2000 + "]" * 2000 + "\n")
    line = _refused(capsys, "train", str(deep))
    assert f"{deep}:1:" in line and "nested more than 64 levels deep" in line
    for key, line in (("out", f'model: {qa_gpt2_dir}\ndata: {{train: sample}}\nout: "run\\0x"\n'),
                      ("data.train", f'model: {qa_gpt2_dir}\ndata: {{train: "facts\\0.jsonl"}}\nout: run\n'),
                      ("model", 'model: "gpt2\\0"\ndata: {train: sample}\nout: run\n')):
        config = tmp_path / f"{key}.yaml"
        config.write_text(line)
        error = _refused(capsys, "train", str(config))
        assert f"{config}: {key} holds a NUL character" in error, error


def test_a_template_format_spec_is_refused_before_it_pads(qa_gpt2_dir, tmp_path):
    template = '"Q: {question:>7000000000}\\nA: {answer}"'  # YAML, double-quoted: a 7 GB question if formatted
    line = _bounded_cli(*_train_args(qa_gpt2_dir, tmp_path / "run", f"data.template={template}"))
    assert "data.template" in line and "format spec" in line


def test_plain_templates_allow_bare_fields_only(qa_gpt2_dir, capsys):
    for bad, why in (("Q: { {question}\nA: {answer}", "unexpected '{'"), ("Q: {question}}\nA: {answer}", "Single '}'"),
                     ("Q: {question!r}\nA: {answer}", "!r"), ("Q: {question:10}\nA: {answer}", ":10")):
        with pytest.raises(ConfigError, match="data.template") as e:
            PromptTemplate(bad)
        assert why in str(e.value)
    assert PromptTemplate("{{literal}} Q: {question}\nA: {answer}").prompt(
        QAExample(question="x?", answer="y", aliases=[])) == "{literal} Q: x?\nA:"
    assert "data.template" in _refused(capsys, "ask", str(qa_gpt2_dir), "Why?", "--no-chat",
                                       "--template", "Q: {question\nA: {answer}")


def _gguf_bytes(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, size: int = 150) -> bytes:
    """A GGUF v3 file of `size` bytes: header, the given key-values and tensor infos, zero padding."""
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors
    return data + b"\0" * (size - len(data))


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_a_150_byte_gguf_declaring_2_to_the_40_elements_is_refused(tmp_path):
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(_gguf_bytes(_gguf_string("general.bomb") + struct.pack("<IIQ", 9, 0, 1 << 40), n_kv=1))
    assert bomb.stat().st_size == 150
    line = _bounded_cli("ask", str(bomb), "Why?")
    assert str(bomb) in line and "general.bomb" in line and "1099511627776" in line


@pytest.mark.parametrize(("what", "data", "named"), [
    ("string length", _gguf_bytes(struct.pack("<Q", 1 << 50) + b"key", n_kv=1), "length of a metadata key"),
    ("kv count", _gguf_bytes(n_kv=1 << 60), "key-value count"),
    ("tensor count", _gguf_bytes(n_tensors=1 << 60), "tensor count"),
    ("string array", _gguf_bytes(_gguf_string("tokens") + struct.pack("<IIQ", 9, 8, 1 << 40), n_kv=1),
     "element count of tokens"),
    ("dimensions", _gguf_bytes(tensors=_gguf_string("w") + struct.pack("<I", 1 << 31), n_tensors=1), "dimensions"),
    ("tensor size", _gguf_bytes(tensors=_gguf_string("w") + struct.pack("<IQQIQ", 2, 1 << 32, 1 << 32, 0, 0),
                                n_tensors=1), "tensor w ends at byte"),
])
def test_every_gguf_header_count_is_checked_against_the_file(tmp_path, what, data, named):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="truncated or corrupt") as e:
        open_gguf(path)
    assert str(path) in str(e.value) and named in str(e.value), (what, str(e.value))


# ------------------------------------------------------------------------------------------- model files


def _llama_gguf(path: Path, **keys: int) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_without_head_or_block_counts_names_the_key(tmp_path, capsys):
    full = {"block_count": 1, "embedding_length": 16, "feed_forward_length": 32, "attention.head_count": 2}
    for missing in ("block_count", "attention.head_count"):
        keys = {k: v for k, v in full.items() if k != missing}
        path = _llama_gguf(tmp_path / f"no-{missing}.gguf", **keys)
        with pytest.raises(ModelError, match=f"GGUF key llama.{missing} is missing"):
            load_base_model(path)
    zero = _llama_gguf(tmp_path / "zero-heads.gguf", **{**full, "attention.head_count": 0})
    line = _refused(capsys, "ask", str(zero), "Why?")
    assert str(zero) in line and "llama.attention.head_count must be a whole number >= 1, got 0" in line


@pytest.mark.parametrize(("change", "message"), [
    ({"n_head": 0}, "field 'n_head' must be a whole number >= 1, got 0"),
    ({"n_head": "4"}, "field 'n_head' must be a whole number >= 1, got '4'"),
    ({"n_head": 3}, "n_embd=64 is not a multiple of n_head=3"),
    ({"n_layer": None}, "field 'n_layer' is missing"),
    ({"layer_norm_epsilon": [1e-5]}, "field 'layer_norm_epsilon' must be a number"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
    ({"eos_token_id": "</s>"}, "field 'eos_token_id' must be a token id"),
])
def test_config_json_fields_are_checked(tiny_gpt2_dir, tmp_path, change, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError) as e:
        load_base_model(model)
    assert str(e.value).startswith(f"{model / 'config.json'}: ") and message in str(e.value), str(e.value)


def test_config_json_that_is_not_an_object_or_not_utf8(tiny_gpt2_dir, tiny_llama_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    (model / "config.json").write_text("[1, 2]")
    assert f"{model / 'config.json'}: the top level must be a JSON object, got list" in _refused(
        capsys, "ask", str(model), "Why?")
    (model / "config.json").write_bytes(b'{"model_type": "gpt2", "name": "caf\xe9"}')
    with pytest.raises(ModelError, match="not valid UTF-8"):
        load_base_model(model)
    llama = tmp_path / "llama"
    shutil.copytree(tiny_llama_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ModelError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        load_base_model(llama)


@pytest.fixture(scope="module")
def adapter_dir(tiny_gpt2_dir, tmp_path_factory) -> Path:
    model = load_base_model(tiny_gpt2_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", base_model_name_or_path="tiny")


@pytest.mark.parametrize(("change", "message"), [
    ({"r": "4"}, "field 'r' must be a whole number >= 1, got '4'"),
    ({"r": 0}, "field 'r' must be a whole number >= 1, got 0"),
    ({"lora_alpha": 0}, "field 'lora_alpha' must be a number > 0, got 0"),
    ({"lora_alpha": "8"}, "field 'lora_alpha' must be a number > 0"),
    ({"use_rslora": "no"}, "field 'use_rslora' must be true or false"),
    ({"rank_pattern": ["c_attn"]}, "field 'rank_pattern' must be an object"),
    ({"alpha_pattern": {"c_attn": "x"}}, "alpha_pattern['c_attn'] must be a number > 0"),
    ({"rank_pattern": {"(c_attn": 4}}, "rank_pattern key '(c_attn' is not a valid regular expression"),
])
def test_adapter_config_fields_are_checked(tiny_gpt2_dir, adapter_dir, tmp_path, change, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelError) as e:
        load_adapter(load_base_model(tiny_gpt2_dir), adapter)
    assert str(e.value).startswith(f"{adapter / ADAPTER_CONFIG}: ") and message in str(e.value), str(e.value)


def test_adapter_config_that_is_not_an_object_or_not_utf8(tiny_gpt2_dir, adapter_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    for content, message in ((b"[]", "the top level must be a JSON object, got list"),
                             (b'{"r": 4, "note": "\xff"}', "not valid UTF-8 (byte 0xff")):
        (adapter / ADAPTER_CONFIG).write_bytes(content)
        with pytest.raises(ModelError, match=message.replace("(", r"\(")):
            load_adapter(load_base_model(tiny_gpt2_dir), adapter)


# ---------------------------------------------------------------------------------------------- chat templates


def _with_chat_template(source: Path, template: str, out: Path) -> Path:
    shutil.copytree(source, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


def test_chat_templates_that_raise_or_do_not_parse(qa_gpt2_dir, tmp_path, capsys):
    refusing = "{% if messages | length > 1 %}{{ raise_exception('one turn only, please') }}{% endif %}" \
               "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = _with_chat_template(qa_gpt2_dir, refusing, tmp_path / "refusing")
    tokenizer = load_tokenizer(model)
    example = QAExample(question="Who?", answer="Me", aliases=["Me"], source="data.jsonl:7")
    with pytest.raises(DataError, match=f"^data.jsonl:7: the chat template of tokenizer {model}"
                                        " refused the conversation: one turn only, please$"):
        ChatFormat(tokenizer).segments(example)

    broken = _with_chat_template(qa_gpt2_dir, "{% for m in messages %}{{ m['content'] }}", tmp_path / "broken")
    with pytest.raises(ModelError, match=f"the chat template of tokenizer {broken} does not parse"):
        ChatFormat(load_tokenizer(broken)).prompt(example)
    assert "does not parse" in _refused(capsys, "ask", str(broken), "Why?", "--chat")


# ---------------------------------------------------------------------------------------------------- devices


def test_a_device_this_machine_lacks_is_one_line(qa_gpt2_dir, tmp_path, capsys):
    line = _refused(capsys, "ask", str(qa_gpt2_dir), "Why?", "--device", "cuda:64")
    assert "--device=cuda:64: this device is not available on this machine (available: cpu" in line
    line = _refused(capsys, "eval", str(qa_gpt2_dir), "--data", "sample-test", "--out", str(tmp_path / "e"),
                    "--device", "tpu")
    assert "--device='tpu' is not a device name; choices: cpu, cuda, cuda:N, mps" in line
    if not torch.backends.mps.is_available():
        line = _refused(capsys, *_train_args(qa_gpt2_dir, tmp_path / "run", "train.device=mps"))
        assert "train.device=mps: this device is not available on this machine" in line
    if not torch.cuda.is_available():
        line = _refused(capsys, "ask", str(qa_gpt2_dir), "Why?", "--device", "cuda")
        assert "--device=cuda: this device is not available" in line


# ----------------------------------------------------------------------------------------------- test hooks


def test_the_fault_hook_announces_the_kill_and_refuses_malformed_values(qa_gpt2_dir, tmp_path, capsys,
                                                                      monkeypatch):
    code = "from qatune.utils.faults import fault_point\nfor _ in range(3):\n    fault_point('renamed')\n"
    env = dict(os.environ, **{FAULT_ENV: "renamed:2"})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert f"{FAULT_ENV}=renamed:2 (a crash-test hook)" in done.stderr and "pass 2 of the fault point 'renamed'" \
        in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr

    for malformed in ("renamed", "renamed:0", "renamed:two", ":3"):
        monkeypatch.setenv(FAULT_ENV, malformed)
        line = _refused(capsys, *_train_args(qa_gpt2_dir, tmp_path / f"run-{malformed}"))
        assert f"{FAULT_ENV}={malformed!r} is malformed" in line and "LABEL:N" in line


# ---------------------------------------------------------------------------------------------------- network


def test_push_without_network_is_one_line(qa_gpt2_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    run = tmp_path / "run"
    assert main(_train_args(qa_gpt2_dir, run)) == 0
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    line = _refused(capsys, "push", str(run), "me/my-adapter")
    assert "upload to me/my-adapter failed" in line and "network connection" in line
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "upload to me/x failed (" in _refused(capsys, "push", str(run), "me/x")  # the error's kind: by hub version
