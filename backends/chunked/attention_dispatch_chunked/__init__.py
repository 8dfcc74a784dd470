"""attention_dispatch_chunked: a third-party backend for attention_dispatch.

Installing this distribution registers the backend ``chunked`` through the
entry point group ``attention_dispatch.backends``; nothing else is needed::

    import attention_dispatch as ad
    out = ad.attention(q, k, v, causal=True, backend="chunked")

Shapes as in :func:`attention_dispatch.attention`: q (B, Hq, Sq, D),
k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> out (B, Hq, Sq, Dv).

Equivalent math (for each chunk of ``chunk_size`` query rows ``r``)::

    s = scale * q[:, :, r] @ k.T + float_mask[..., r, :]
    s[~(bool_mask[..., r, :] & key_padding & causal_bottom_right[r])] = -inf
    out[:, :, r] = softmax(s) @ v      # rows of all -inf -> 0, lse -inf
"""

from ._backend import CHUNK_SIZE_ENV, ChunkedBackend
from ._kernel import chunked_attention

__version__ = "0.1.0"

__all__ = ["CHUNK_SIZE_ENV", "ChunkedBackend", "__version__", "chunked_attention"]
