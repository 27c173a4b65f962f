"""`qatune push RUN REPO_ID`: upload a run's result folder (`RUN/adapter` or `RUN/model`, model card included) to the
Hugging Face Hub with `huggingface_hub`. `--dry-run` lists what would be uploaded and checks the card locally
(the Hub's own validation needs a connection)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, metadata_load
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.errors import HTTPError as HubHTTPLibraryError  # httpx's (hub >= 1.0) or requests' base error
from huggingface_hub.utils import validate_repo_id

from qatune.errors import ConfigError, ModelError
from qatune.publish.model_card import write_model_card
from qatune.runs.layout import RunDir


def check_card(path: Path) -> tuple[dict, int]:
    """The card's metadata, parsed the way the Hub parses it, and its number of model-index metrics; a card
    that does not parse is an error."""
    try:
        metadata = metadata_load(path) or {}
        card = ModelCard.load(path)  # parses model-index into EvalResults: fails on a malformed one
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path} is not a valid model card: {e}") from e
    base = metadata.get("base_model")
    if base is not None:
        try:
            validate_repo_id(base)
        except HFValidationError as e:
            raise ModelError(f"{path}: base_model {base!r} is not a hub id: {e}") from e
    return metadata, len(card.data.eval_results or [])


def push_run(run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False) -> str:
    """Upload the result of `run_dir` to `repo_id` (created when missing); returns what was (or would be) done."""
    run = RunDir(run_dir)
    folder, card = run.result, run.card
    if folder is None:
        raise ModelError(f"{run.path} has no result to push: expected {run.adapter} or {run.model}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{repo_id!r} is not a valid repository id (user/name): {e}") from e
    write_model_card(run.path)  # the card always shows the run's latest figures
    metadata, n_metrics = check_card(card)
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    listing = "\n".join(f"  {f.relative_to(folder)}  ({f.stat().st_size:,} bytes)" for f in files)
    header = (f"{'would upload' if dry_run else 'uploading'} {len(files)} files from {folder} to "
              f"https://huggingface.co/{repo_id} ({'private' if private else 'public'}):\n{listing}\n"
              f"model card {card.name}: valid (library_name {metadata.get('library_name')}, "
              f"base_model {metadata.get('base_model')}, {n_metrics} model-index metrics)")
    if dry_run:
        return header
    return f"{header}\ndone: {_upload(folder, repo_id, private, f'Upload {run.path.resolve().name} (qatune)')}"


def _upload(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Create `repo_id` if needed and upload `folder`; the commit's URL. No network, a refused login or a
    failing Hub is one `ModelError` line."""
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except (HfHubHTTPError, OSError, HubHTTPLibraryError) as e:  # OSError: offline mode, requests' connection errors
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"upload to {repo_id} failed ({type(e).__name__}: {reason}); check the network connection, "
                         "and log in with `hf auth login` or set HF_TOKEN") from e
    return str(getattr(commit, "commit_url", commit))
