"""Nothing silently wrong with a run directory (README, "Reliability"): overwrite=true empties only a run, a run
loads the base model it was trained on from anywhere, merge and export replace their target whole, a resume
refuses changed data and skips a tampered state, no write goes through a link, results follow the umask, and
the messages of divergence, a full disk and an interrupted evaluation say what is true."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_run import one_error_line as _one_error_line
from cli_run import run_cli as _run
from cli_run import train_args as _train_args
from safetensors.torch import load_file, save_file

from qatune.cli.commands import main
from qatune.errors import ConfigError, ModelError, StorageError
from qatune.generation.runs import load_for_inference
from qatune.lora.inject import merged_state_dict
from qatune.models.loading import load_base_model
from qatune.publish.gguf import export_gguf
from qatune.publish.merge import merge_run
from qatune.runs.layout import EvalDir
from qatune.training.recipe import _diverged
from qatune.utils.io import atomic_write_text, write_dir_atomically


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _perturbed_copy(model_dir: Path, to: Path, scale: float) -> Path:
    """The same architecture and tokenizer with other weights (every float tensor scaled)."""
    shutil.copytree(model_dir, to)
    tensors = load_file(to / "model.safetensors")
    save_file({k: v * scale for k, v in tensors.items()}, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[3, 5, 7, 11]]))


# ------------------------------------------------------------------------------- 1. overwrite=true, data loss


def test_overwrite_refuses_a_folder_that_is_not_a_run(qa_gpt2_dir, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "project"
    for folder in ("model", "eval", "checkpoints"):
        (mine / folder).mkdir(parents=True)
        (mine / folder / "keep.txt").write_text("the user's")
    (mine / "config.yaml").write_text("learning: rate\n")  # a config.yaml, but not a qatune run's
    (mine / "notes.txt").write_text("mine")
    before = _snapshot(mine)
    for extra in (["overwrite=true"], []):
        code, err = _run(capsys, *_train_args(qa_gpt2_dir, mine, *extra))
        line = _one_error_line(err)
        assert code == 2 and "checkpoints, config.yaml, eval, model" in line and "no qatune config.yaml" in line, line
        assert _snapshot(mine) == before

    monkeypatch.chdir(mine)  # the current directory: out=. and out=''
    code, err = _run(capsys, *_train_args(qa_gpt2_dir, ".", "overwrite=true"))
    assert code == 2 and "overwrite=true replaces a qatune run" in _one_error_line(err)
    code, err = _run(capsys, *_train_args(qa_gpt2_dir, "", "overwrite=true"))
    assert code == 2 and "empty" in _one_error_line(err)  # refused by the config itself
    assert _snapshot(mine) == before


# ------------------------------------------------------------------------- 3. the base model, from anywhere


@pytest.fixture(scope="module")
def relative_base_run(qa_gpt2_dir, tmp_path_factory):
    """A LoRA run trained in `home` with `model=base` (a relative path): (home, run)."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(qa_gpt2_dir, home / "base")
    cwd = Path.cwd()
    os.chdir(home)
    try:
        assert main(_train_args("base", "run", "train.max_steps=2", "train.eval_every=100")) == 0
    finally:
        os.chdir(cwd)
    return home, home / "run"


@pytest.fixture(scope="module")
def lora_run(qa_gpt2_dir, tmp_path_factory) -> Path:
    """A LoRA run whose base model is named by its absolute path."""
    run = tmp_path_factory.mktemp("lora") / "run"
    assert main(_train_args(qa_gpt2_dir, run, "train.max_steps=2", "train.eval_every=100")) == 0
    return run


def test_a_run_loads_its_own_base_model_from_another_folder(relative_base_run, tmp_path, monkeypatch):
    home, run = relative_base_run
    record = json.loads((run / "base.json").read_text())
    assert record["path"] == str(home / "base") and "model.safetensors" in record["files"]
    monkeypatch.chdir(home)
    expected = _logits(load_for_inference(run)[0])
    other = tmp_path / "elsewhere"
    _perturbed_copy(home / "base", other / "base", 0.5)  # another model at the same relative path
    monkeypatch.chdir(other)
    assert torch.equal(_logits(load_for_inference(os.path.relpath(run, other))[0]), expected)


def test_a_changed_base_model_is_an_error_naming_it(relative_base_run, tmp_path):
    home, run = relative_base_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = home / "base" / "model.safetensors"
    original = weights.read_bytes()
    try:
        changed = load_file(weights)
        changed["transformer.wte.weight"] = changed["transformer.wte.weight"] + 1  # same size, other content
        save_file(changed, str(weights), metadata={"format": "pt"})
        assert weights.stat().st_size == len(original)
        with pytest.raises(ModelError, match=f"{weights}: its content \\(SHA-256\\) changed"):
            load_for_inference(copy)
        weights.write_bytes(original[:-8])
        with pytest.raises(ModelError, match=f"{weights}: it has {len(original) - 8} bytes"):
            load_for_inference(copy)
    finally:
        weights.write_bytes(original)
    load_for_inference(copy)  # the same bytes again (another mtime): hashed once, accepted


def test_a_run_without_base_record_takes_a_relative_path_from_the_run(relative_base_run, tmp_path, monkeypatch):
    """Runs written before base.json: `model=base` is looked up beside the run's files, never in the current
    folder (where another model may sit under that name)."""
    home, run = relative_base_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "base.json").unlink()
    monkeypatch.chdir(home)  # ./base exists here, but the run does not say it is relative to here
    with pytest.raises(ModelError, match="names its base model by the relative path base"):
        load_for_inference(old)
    shutil.copytree(home / "base", old / "base")
    monkeypatch.chdir(tmp_path)
    load_for_inference(old)


# ------------------------------------------------------------------------------ 4. merge and export targets


def test_merge_replaces_an_existing_model_folder_whole(lora_run, qa_gpt2_dir, tmp_path):
    run = lora_run
    out = tmp_path / "merged"
    old = load_base_model(_perturbed_copy(qa_gpt2_dir, tmp_path / "old", 2.0))
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "old").save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()  # a sharded model: index and shards
    (tmp_path / ".merged.tmp-abcd1234").mkdir()  # what an interrupted merge left beside it
    (tmp_path / ".merged.old-abcd1234").mkdir()
    merge_run(run, out)
    assert sorted(p.name for p in tmp_path.glob(".merged*")) == []
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*"))
    model, _ = load_for_inference(run)
    merged = load_base_model(out)
    reference = merged_state_dict(model)
    assert all(torch.equal(merged.state_dict()[k], reference[k]) for k in reference)
    assert not torch.equal(_logits(merged), _logits(old))


def test_merge_refuses_a_folder_with_other_files(lora_run, tmp_path):
    run = lora_run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(ModelError, match="holds thesis.tex"):
        merge_run(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "thesis.tex"]


def test_export_writes_a_scratch_file_and_a_full_disk_says_so(qa_gpt2_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    (tmp_path / ".model.gguf.tmp-abcd1234").write_bytes(b"half")  # an interrupted export's scratch file
    export_gguf(qa_gpt2_dir, out, out_type="f32")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    before = out.read_bytes()

    import gguf

    def short_write(self, *args, **kwargs):  # what numpy's tofile raises when the disk fills up mid-tensor
        raise OSError("32768 requested and 24664 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short_write)
    with pytest.raises(StorageError) as e:
        export_gguf(qa_gpt2_dir, out, out_type="f32")
    assert str(e.value) == f"cannot write {out}: no space left on device"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and out.read_bytes() == before


# --------------------------------------------------------------------------------- 5, 6. what a resume uses


def test_resume_refuses_changed_data(qa_gpt2_dir, tmp_path, capsys):
    from qatune.data.readers import DATA_ALIASES

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    shutil.copy(DATA_ALIASES["sample"], train)
    shutil.copy(DATA_ALIASES["sample-test"], val)
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, f"data.train={train}", f"data.val={val}", "train.save_every=1",
                       "train.eval_every=100")
    assert _run(capsys, *args, "train.max_steps=2")[0] == 0
    before = _snapshot(run)
    rows = val.read_text().splitlines(keepends=True)
    val.write_text("".join(rows[:-1]))  # one validation row fewer
    code, err = _run(capsys, *args, "train.max_steps=4", "resume=true")
    line = _one_error_line(err)
    assert code == 2 and f"data.val {val}: {len(''.join(rows).encode())} bytes at the checkpoint" in line, line
    assert _snapshot(run) == before
    val.write_text("".join(rows).replace("?", "!", 1))  # same size, other content
    code, err = _run(capsys, *args, "train.max_steps=4", "resume=true")
    assert code == 2 and f"data.val {val}: its content changed" in _one_error_line(err)
    val.write_text("".join(rows))
    assert _run(capsys, *args, "train.max_steps=4", "resume=true")[0] == 0


def _tamper_state(ckpt: Path, edit) -> None:
    """Change state.json and rewrite the manifest to match, as someone who knows the format would."""
    state_json = ckpt / "state.json"
    state_json.write_bytes(edit(state_json.read_bytes()))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": state_json.stat().st_size,
                                       "sha256": hashlib.sha256(state_json.read_bytes()).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _json_edit(change):
    def edit(raw: bytes) -> bytes:
        state = json.loads(raw)
        change(state)
        return json.dumps(state).encode()
    return edit


_TAMPERINGS = {
    "wrong-type": _json_edit(lambda s: s["train_state"].update(step="two")),
    "missing-key": _json_edit(lambda s: s.pop("scheduler")),
    "missing-tensor": _json_edit(lambda s: s["rng"].update(torch={"__tensor__": "t999"})),
    "not-utf8": lambda raw: raw.replace(b'"train_state"', b'"train_st\xffte"'),
}


@pytest.mark.parametrize("tampering", sorted(_TAMPERINGS))
def test_a_tampered_state_json_falls_back_to_the_older_checkpoint(qa_gpt2_dir, tmp_path, capsys, tampering):
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1", "train.eval_every=100", "train.keep_checkpoints=3")
    assert _run(capsys, *args, "train.max_steps=2")[0] == 0
    _tamper_state(run / "checkpoints" / "step-000002", _TAMPERINGS[tampering])
    code, err = _run(capsys, *args, "train.max_steps=3", "resume=true")
    assert code == 0, err
    assert "Skipping damaged checkpoint step-000002: " in err and "state.json" in err
    assert f"Resumed from {run / 'checkpoints' / 'step-000001'}" in err


def test_no_readable_state_is_one_error(qa_gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1", "train.eval_every=100")
    assert _run(capsys, *args, "train.max_steps=2")[0] == 0
    for step in ("step-000001", "step-000002"):
        _tamper_state(run / "checkpoints" / step, _TAMPERINGS["wrong-type"])
    before = _snapshot(run)
    code, err = _run(capsys, *args, "train.max_steps=3", "resume=true")
    line = _one_error_line(err)
    assert code == 2 and "is intact" in line and "train_state.step is 'two', not int" in line, line
    assert _snapshot(run) == before


# ------------------------------------------------------------------------ 7, 8. links and file permissions


@pytest.mark.parametrize("name", ["adapter", "metrics.jsonl", "checkpoints"])
def test_no_write_goes_through_a_link_in_a_run(qa_gpt2_dir, tmp_path, capsys, name):
    run, outside = tmp_path / "run", tmp_path / "outside"
    args = _train_args(qa_gpt2_dir, run, "train.save_every=1", "train.eval_every=100")
    assert _run(capsys, *args, "train.max_steps=2")[0] == 0
    outside.mkdir()
    shutil.move(run / name, outside / name)
    os.symlink(outside / name, run / name)
    before = _snapshot(outside)
    code, err = _run(capsys, *args, "train.max_steps=3", "resume=true")
    assert code == 2 and f"{run / name} is a symbolic link" in _one_error_line(err)
    assert _snapshot(outside) == before


def test_eval_does_not_write_through_a_linked_result(lora_run, tmp_path):
    from qatune.evaluation.measure import evaluate

    run = lora_run
    copy, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(run, copy)
    shutil.move(copy / "adapter", outside)
    os.symlink(outside, copy / "adapter")
    before = _snapshot(outside)
    with pytest.raises(ConfigError, match=f"{copy / 'adapter'} is a symbolic link"):
        evaluate(copy, "sample-test", max_examples=2, loss=False, progress=False)
    assert _snapshot(outside) == before and not (copy / "eval").exists()


def test_results_follow_the_umask(qa_gpt2_dir, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "f").write_text("x"))
        run = tmp_path / "run"
        assert _run(capsys, *_train_args(qa_gpt2_dir, run, "train.max_steps=1", "train.eval_every=100"))[0] == 0
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [tmp_path / "a.json", tmp_path / "d", run / "summary.json",
                                                    run / "config.yaml", run / "adapter", run / "checkpoints" / "last"]}
    assert modes == {tmp_path / "a.json": 0o640, tmp_path / "d": 0o750, run / "summary.json": 0o640,
                     run / "config.yaml": 0o640, run / "adapter": 0o750, run / "checkpoints" / "last": 0o750}


# ------------------------------------------------------------------------------------- 9. true messages


def test_the_divergence_message_is_true_with_and_without_a_checkpoint(tmp_path):
    r = SimpleNamespace(checkpoints=tmp_path / "checkpoints")
    without = _diverged(r, 1, "the training loss is nan")
    assert "no checkpoint was written before it" in without and "continues from that checkpoint" not in without
    assert "start again from step 0" in without
    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    os.symlink("step-000003", tmp_path / "checkpoints" / "last")
    with_one = _diverged(r, 4, "the training loss is nan")
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-000003'} (step 3)" in with_one
    assert "resume=true continues from that checkpoint" in with_one and "no checkpoint" not in with_one


def test_an_interrupted_evaluation_never_pairs_new_predictions_with_old_metrics(tmp_path, monkeypatch):
    folder = EvalDir(tmp_path / "eval")
    folder.write({"f1": 0.1}, [{"prediction": "old"}])
    import qatune.runs.layout as layout

    real = layout.atomic_write_text

    def full_disk_at_metrics(path, text):
        if Path(path).name == folder.metrics.name:
            raise StorageError(f"cannot write {path}: no space left on device")
        return real(path, text)

    monkeypatch.setattr(layout, "atomic_write_text", full_disk_at_metrics)
    with pytest.raises(StorageError):
        folder.write({"f1": 0.9}, [{"prediction": "new"}])
    assert not folder.done() and "new" in folder.predictions.read_text()
