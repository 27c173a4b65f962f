"""qatune: fine-tune GPT-2-family and other small causal LMs on question-answer data, full or LoRA."""

from .errors import QatuneError
from .loading import load_model
from .lora import count_parameters
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["QatuneError", "count_parameters", "load_model", "load_tokenizer", "__version__"]
