"""Structured attention built on the dispatch core: packed variable-length
batches (:func:`attention_varlen`), paged KV caches (:func:`attention_paged`)
and merging partial results (:func:`merge_attention`).  See docs/structured.md."""

from .merge import merge_attention
from .paged import attention_paged, explain_paged
from .varlen import attention_varlen

__all__ = ["attention_paged", "attention_varlen", "explain_paged", "merge_attention"]
