"""A CPU backend that is wrong only for some shapes (Sk a multiple of 16):
verify mode must catch it.  Also used by a fresh process in tests/test_verify.py."""

from __future__ import annotations

from typing import Any

import torch

import attention_dispatch as ad

NAME = "wrong-on-16"


class WrongOn16(ad.Backend):
    """math's answer, plus 0.5 when Sk is a multiple of 16."""

    name = NAME
    capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                   dtypes=frozenset({torch.float32}), dropout=True,
                                   empty_rows_exact=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
        out, lse = ad.get_backend("math").forward(q, k, v, **kw)
        if k.shape[2] % 16 == 0:
            out = out + 0.5
        return out, lse


def register() -> None:
    if NAME not in ad.list_backends():
        ad.register_backend(NAME)(WrongOn16)
