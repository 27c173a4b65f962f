"""Text from a model: decoding with a KV cache (`decode.py`), answering questions (`answer.py`), and loading a
model or a run directory to answer with (`runs.py`). Merging and exporting a run are `qatune.publish`'s."""

from qatune.generation.answer import answer_questions
from qatune.generation.decode import GenerationConfig, generate, generate_text
from qatune.generation.runs import load_for_inference

__all__ = ["GenerationConfig", "answer_questions", "generate", "generate_text", "load_for_inference"]
