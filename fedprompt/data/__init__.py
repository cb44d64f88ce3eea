"""Data: labelled text from the builtin corpus, the Hub or local files, and its split among clients."""

from fedprompt.data.builtin import load_builtin, load_chatterbot_corpus
from fedprompt.data.loading import DataError, TextClassificationData, load_text_classification
from fedprompt.data.partition import (
    partition_by_class,
    partition_class_ranges,
    partition_indices,
    split_local,
)

__all__ = [
    "DataError",
    "TextClassificationData",
    "load_builtin",
    "load_chatterbot_corpus",
    "load_text_classification",
    "partition_by_class",
    "partition_class_ranges",
    "partition_indices",
    "split_local",
]
