"""diffusers: an attention processor that runs through attention_dispatch.

``model.set_attn_processor(AttentionDispatchProcessor())`` replaces diffusers'
default processor (``AttnProcessor2_0``) in every ``Attention`` module of a
model (UNet2DConditionModel, the VAE, ...): self- and cross-attention, with
``attention_mask`` / ``encoder_attention_mask``.

* Q, K, V stay in the projections' (B, S, H, D) layout (``layout="bshd"``):
  no transposes.
* A bool mask that is the same for every query (B, 1, 1, Sk) goes to kernels
  as ``key_padding_mask``; other masks as ``mask=``.  diffusers' UNet turns
  ``encoder_attention_mask`` into an additive 0 / -10000 bias before any
  processor sees it; that bias is passed on as an additive (B, 1, 1, Sk) mask,
  exactly as the default processor uses it (no (Sq, Sk) tensor is built).

Models whose attention modules have their own processors (Flux, SD3 and other
transformer models, through ``dispatch_attention_fn``) are not served by this
processor (it refuses them with an error): run them under
:func:`attention_dispatch.patch_sdpa`, since diffusers' "native" attention
backend calls ``torch.nn.functional.scaled_dot_product_attention`` at call time.

diffusers (0.42) has a registry of attention backends, but it is keyed by a
closed ``Enum`` (``AttentionBackendName``): ``attention_backend(name)`` and
``set_attention_backend(name)`` convert the name with that Enum and reject any
other, so a new backend cannot be registered without changing diffusers'
private Enum.  Hence the processor and the patch instead.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

import attention_dispatch as ad

Tensor = torch.Tensor


def _attention_class() -> type:
    from diffusers.models.attention_processor import Attention

    return Attention


def _check_module(attn: Any) -> None:
    if not isinstance(attn, _attention_class()):
        raise ad.AttentionTypeError(
            "attn", "a diffusers Attention module", type(attn).__name__,
            "this model's attention has its own processor; run it under "
            "attention_dispatch.patch_sdpa() instead")
    if getattr(attn, "added_kv_proj_dim", None) is not None \
            or getattr(attn, "add_k_proj", None) is not None:
        raise ad.AttentionInputError(
            "attn", "an Attention module without added (joint) projections",
            "a joint-attention module (added_kv_proj_dim is set)",
            "keep its own processor and run the model under attention_dispatch.patch_sdpa()")


def _masks(attn: Any, mask: Optional[Tensor], keys: int, batch: int
           ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """diffusers' attention_mask -> (mask broadcastable to (B, H, Sq, Sk), key padding)."""
    if mask is None:
        return None, None
    if mask.shape[-1] != keys or mask.dim() not in (2, 3, 4):
        # diffusers' own preparation (pads, repeats per head), then (B, H, Sq|1, Sk)
        mask = attn.prepare_attention_mask(mask, keys, batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    elif mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dtype == torch.bool and mask.shape[1:3] == (1, 1):
        return None, mask[:, 0, 0].expand(batch, keys)
    return mask, None


class AttentionDispatchProcessor:
    """A diffusers attention processor: ``AttnProcessor2_0``'s computation with
    the attention itself run by :func:`attention_dispatch.attention`.

    Args:
        backend: as in :func:`attention_dispatch.attention` ("auto" defers to
            ``use_backend`` and ``ATTENTION_DISPATCH_BACKEND``).

    The score scale is ``attn.scale`` (1/sqrt(head dim) unless the module was
    built with ``scale_qk=False``); the default processor ignores
    ``attn.scale`` and always uses 1/sqrt(head dim): the same in every model
    that uses it.

    Equivalent math (per ``Attention`` module ``attn``)::

        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)   # (B, S, H*D)
        out = attention(q.view(B, Sq, H, D), k.view(B, Sk, H, D), v.view(B, Sk, H, D),
                        mask=attention_mask, scale=attn.scale, layout="bshd")
        return attn.to_out(out.reshape(B, Sq, H * D))   # + residual, / rescale_output_factor

    Raises:
        AttentionTypeError / AttentionInputError: for attention modules it does
            not cover (Flux, SD3 joint attention): use ``patch_sdpa()`` there.
    """

    def __init__(self, backend: Union[str, Sequence[str]] = "auto") -> None:
        self.backend = backend

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 *args: Any, **kwargs: Any) -> Tensor:
        _check_module(attn)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        out = self._attend(attn, attn.to_q(hidden_states), attn.to_k(context),
                           attn.to_v(context), attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, attn: Any, q: Tensor, k: Tensor, v: Tensor,
                attention_mask: Optional[Tensor]) -> Tensor:
        batch, heads = q.shape[0], attn.heads
        head_dim = k.shape[-1] // heads
        q = q.view(batch, -1, heads, head_dim)
        k = k.view(batch, -1, heads, head_dim)
        v = v.view(batch, -1, heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask, kpm = _masks(attn, attention_mask, k.shape[1], batch)
        out = ad.attention(q, k, v, mask=mask, key_padding_mask=kpm, scale=attn.scale,
                           layout="bshd", backend=self.backend)
        return out.reshape(batch, -1, heads * head_dim).to(q.dtype)  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"AttentionDispatchProcessor(backend={self.backend!r})"


__all__ = ["AttentionDispatchProcessor"]
