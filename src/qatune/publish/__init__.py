"""What leaves qatune: a LoRA run merged into a standalone Hugging Face checkpoint (`merge.py`), a run or a model
as one GGUF file for llama.cpp and Ollama (`gguf.py`, written by `gguf_writer.py` with the tokenizer of
`gguf_vocab.py`), the Hugging Face model card of a run (`model_card.py`) and its upload to the Hub (`push.py`)."""
