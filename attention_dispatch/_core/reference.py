"""The float64 reference of the contract and its accuracy rule.

Part of the dispatch core (the numeric canary and verify mode use it);
:mod:`attention_dispatch.testing` re-exports it for conformance tests.
Written plainly from the contract, independent of every adapter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def atol(dtype: torch.dtype) -> float:
    """The small absolute slack of the accuracy rule for ``dtype``."""
    return ATOL[dtype]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Tensor] = None,
                        key_padding_mask: Optional[Tensor] = None, causal: bool = False,
                        scale: Optional[float] = None,
                        window: Optional[tuple[int, int]] = None,
                        softcap: Optional[float] = None,
                        alibi_slopes: Optional[Tensor] = None,
                        sinks: Optional[Tensor] = None,
                        precision: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Float64 attention written plainly from the contract, (B, H, S, D) layout.

    Returns (out, lse) in ``precision`` (float64 unless asked otherwise).  Rows with no key they may attend give out 0, lse -inf,
    and zero gradients.  Independent of the package's adapters on purpose.
    Key/value slots that ``key_padding_mask`` excludes are never read: NaN or
    Inf stored there changes nothing, and their gradients are 0.

    Structured attention: ``softcap`` c turns the scaled scores into
    c * tanh(s / c) (before anything is added or masked); ``alibi_slopes``
    ((Hq,) or (B, Hq)) adds -slope * |i + Sk - Sq - j|; ``window`` (left,
    right) keeps i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1 = open).

    ``sinks`` (Hq,): one more column in every row's softmax, holding sinks[h]
    (after every mask; -inf = no sink), whose value is zero: it takes its share
    of the probability mass and of the lse.  A row with no key then gives out
    0 and lse sinks[h].
    """
    dt = precision
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    heads = torch.arange(Hq) // (Hq // Hkv)
    k, v = k[:, heads], v[:, heads]
    if key_padding_mask is not None:  # padded slots are never read
        padded = ~key_padding_mask[:, None, :, None].to(q.device)
        k, v = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt).reshape(-1, Hq)  # (1 or B, Hq)
        distance = (i + (Sk - Sq) - j).abs().to(dt)
        s = s - slopes[:, :, None, None] * distance
    allowed = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool, device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(dt)
        allowed = allowed & (mask.to(dt) > float("-inf"))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & (j <= i + (Sk - Sq))
    if window is not None and window[0] >= 0:
        allowed = allowed & (j >= i + (Sk - Sq) - window[0])
    if window is not None and window[1] >= 0:
        allowed = allowed & (j <= i + (Sk - Sq) + window[1])
    if sinks is not None:  # the sink column: a virtual key, value 0
        col = sinks.to(device=q.device, dtype=dt).reshape(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
        s = torch.cat([s.expand(B, Hq, Sq, Sk), col], -1)
        allowed = torch.cat([allowed, col > float("-inf")], -1)
        v = torch.cat([v, v.new_zeros(B, Hq, 1, v.shape[-1])], 2)
    row_ok = allowed.any(-1, keepdim=True)
    s = torch.where(allowed, s, torch.full_like(s, float("-inf")))
    s_safe = torch.where(row_ok, s, torch.zeros_like(s))
    p = torch.where(row_ok, torch.softmax(s_safe, -1), torch.zeros_like(s))
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    lse = torch.where(row_ok[..., 0], torch.logsumexp(s_safe, -1),
                      torch.full(s.shape[:-1], float("-inf"), dtype=s.dtype, device=s.device))
    return out, lse


def within_rule(err: float, err_math: float, ref_max: float, dtype: torch.dtype) -> bool:
    """The contract's accuracy rule: ``err <= 2 * err_math + atol(dtype) * (1 + ref_max)``
    (float64: the slack alone).  NaN never passes."""
    slack = atol(dtype) * (1 + ref_max)
    bound = slack if dtype == torch.float64 else 2 * err_math + slack
    return err <= bound
