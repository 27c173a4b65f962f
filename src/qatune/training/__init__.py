"""Training: the run configuration (`config.py`), the recipe (`recipe.py`: `train_model`, in parts), and what it
is made of: data and model building (`build.py`), optimizer and schedule (`optim.py`), the training state
(`state.py`), checkpoints (`checkpoint.py`, stored without pickle by `statefile.py`), whether a run may start
or continue in its directory and what a resume may change (`resume_check.py`; the directory's names are
`qatune.runs.layout`'s), processes (`parallel.py`), metric logs (`loggers.py`), results (`result.py`) and the
transformers + peft backend (`hf_backend.py`)."""

from qatune.utils.lazy import lazy_exports

_EXPORTS = {
    "RunConfig": "qatune.training.config",
    "load_config": "qatune.training.config",
    "train_model": "qatune.training.recipe",
}
__all__ = ["RunConfig", "load_config", "train_model"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
