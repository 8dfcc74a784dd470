"""Structured attention built on the dispatch core: packed variable-length
batches (:func:`attention_varlen`) and merging partial results
(:func:`merge_attention`).  See docs/structured.md."""

from .merge import merge_attention
from .varlen import attention_varlen

__all__ = ["attention_varlen", "merge_attention"]
