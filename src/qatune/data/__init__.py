"""QA data, independent of any model: readers of every supported format (`readers.py`), prompt templates
(`prompts.py`), and tokenised features, padding, packing and batch plans (`batching.py`)."""

from qatune.data.batching import Feature, batches, collate, encode_dataset, encode_example, plan_batches
from qatune.data.prompts import DEFAULT_TEMPLATE, PromptTemplate
from qatune.data.readers import SAMPLE_DATA, DataReport, QAExample, load_examples, resolve_data, split_train_val

__all__ = ["DEFAULT_TEMPLATE", "SAMPLE_DATA", "DataReport", "Feature", "PromptTemplate", "QAExample", "batches",
           "collate", "encode_dataset", "encode_example", "load_examples", "plan_batches", "resolve_data",
           "split_train_val"]
