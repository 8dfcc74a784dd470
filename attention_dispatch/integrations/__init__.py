"""Glue for the libraries people already use (docs/integrations.md).

* :mod:`attention_dispatch.integrations.transformers`: ``register()`` makes
  ``attn_implementation="attention_dispatch"`` work in transformers;
* :mod:`attention_dispatch.integrations.diffusers`: an attention processor;
* :mod:`attention_dispatch.integrations.heads`: interleaved kv-head grouping
  (``h % Hkv``, x-transformers' convention) on top of the contract's grouped one.

Nothing here is imported by ``import attention_dispatch``, and importing this
package imports neither transformers nor diffusers: each submodule imports its
library when it is imported itself.
"""

from __future__ import annotations

from .heads import grouped_to_interleaved, interleaved_attention, interleaved_to_grouped

__all__ = ["grouped_to_interleaved", "interleaved_attention", "interleaved_to_grouped"]
