"""Benchmark cases and presets."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Union

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}
MASKS = ("none", "padding", "bool")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class BenchCase:
    """One timed call: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), bhsd layout.

    mask: "none", "padding" (half of the batch has half its keys padded) or
    "bool" (a random dense bool mask, 10 % masked).
    """

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: str = "bf16"
    causal: bool = False
    mask: str = "none"
    mode: str = "fwd"

    @property
    def flops(self) -> float:
        """4·B·H·Sq·Sk·D per forward (half when causal), ×2.5 for fwd+bwd."""
        f = 4.0 * self.batch * self.heads_q * self.seq_q * self.seq_k * self.head_dim
        if self.causal and self.seq_q > 1:
            f /= 2
        return f * (2.5 if self.mode == "fwd+bwd" else 1.0)

    def label(self) -> str:
        gqa = f"{self.heads_q}/{self.heads_kv}" if self.heads_kv != self.heads_q else str(self.heads_q)
        return (f"{self.dtype} B{self.batch} H{gqa} q{self.seq_q} k{self.seq_k} d{self.head_dim}"
                f"{' causal' if self.causal else ''}{'' if self.mask == 'none' else ' ' + self.mask}"
                f" {self.mode}")

    def inputs(self, device: torch.device, requires_grad: bool) -> dict[str, Any]:
        dt = DTYPES[self.dtype]
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(h: int, s: int) -> torch.Tensor:
            t = torch.randn(self.batch, h, s, self.head_dim, generator=g, dtype=torch.float32)
            return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

        kw: dict[str, Any] = dict(q=rnd(self.heads_q, self.seq_q), k=rnd(self.heads_kv, self.seq_k),
                                  v=rnd(self.heads_kv, self.seq_k), causal=self.causal)
        if self.mask == "padding":
            kpm = torch.ones(self.batch, self.seq_k, dtype=torch.bool)
            kpm[: (self.batch + 1) // 2, self.seq_k // 2:] = False
            kw["key_padding_mask"] = kpm.to(device)
        elif self.mask == "bool":
            kw["mask"] = (torch.rand(self.batch, 1, self.seq_q, self.seq_k, generator=g) > 0.1
                          ).to(device)
        return kw


CaseKey = tuple[Any, ...]


def case_key(case: Union[BenchCase, Mapping[str, Any]]) -> CaseKey:
    """A case's identity: the values of its BenchCase fields.  Bench rows carry
    the same fields, so a row maps to the case it was measured on."""
    values = asdict(case) if isinstance(case, BenchCase) else case
    return tuple(values.get(f.name) for f in fields(BenchCase))


def _tokens_grid(tokens: int, seqs: Iterable[int], heads: int, dims: Iterable[int]
                 ) -> list[tuple[int, int, int, int]]:
    """B = tokens // S; heads=0 means a model width of 2048 (H = 2048 // D)."""
    return [(max(1, tokens // s), heads or 2048 // d, s, d) for s in seqs for d in dims]


def grid(shapes: list[tuple[int, int, int, int]], dtypes: list[str], causal: list[bool],
         masks: list[str], modes: list[str], kv_heads: int = 0) -> list[BenchCase]:
    """Cross product of (B, H, S, D) shapes with the other axes (self-attention)."""
    out = []
    for (b, h, s, d), dt, c, m, mode in itertools.product(shapes, dtypes, causal, masks, modes):
        out.append(BenchCase(b, h, kv_heads or h, s, s, d, dt, c, m, mode))
    return out


def decode_cases(dtypes: list[str], seqs: Iterable[int] = (4096, 32768, 131072),
                 batches: Iterable[int] = (1, 8, 32)) -> list[BenchCase]:
    """Decode: B in ``batches``, Hq=32, Hkv=8, Sq=1, Sk in ``seqs``, causal
    (bottom-right: every key visible).  B=1 and 8 at long Sk leave one split
    per (row, kv head) far short of the SMs: kernels that split the keys win."""
    return [BenchCase(b, 32, 8, 1, s, 128, dt, True, "none", "fwd")
            for dt in dtypes for b in batches for s in seqs]


def preset(name: str, device: torch.device) -> list[BenchCase]:
    """"quick" (under a minute on a 2-core CPU), "default" or "decode"."""
    if name == "quick":
        if device.type == "cpu":
            return grid(_tokens_grid(1024, (256, 1024), 4, (64,)), ["fp32"], [False, True],
                        ["none", "padding"], ["fwd"])
        return grid(_tokens_grid(16384, (1024, 4096), 16, (128,)), ["bf16"], [False, True],
                    ["none"], ["fwd"])
    if name == "decode":
        return decode_cases(["bf16"])
    if name != "default":
        raise ValueError(f"--shapes: unknown preset {name!r}; expected quick, default or decode")
    if device.type == "cpu":
        return grid(_tokens_grid(2048, (256, 512, 1024, 2048), 8, (64,)), ["fp32", "bf16"],
                    [False, True], ["none", "padding"], ["fwd", "fwd+bwd"])
    dims = (64, 128)
    cases = decode_cases(["bf16"])  # first: seconds each, no compile per signature
    cases += grid(_tokens_grid(16384, (1024, 2048, 4096, 8192, 16384), 0, dims),
                 ["bf16", "fp16"], [False, True], ["none"], ["fwd", "fwd+bwd"])
    cases += grid(_tokens_grid(16384, (4096, 16384), 32, (128,)), ["bf16"], [False, True],
                  ["none"], ["fwd", "fwd+bwd"], kv_heads=8)
    cases += grid([(4, 16, 8192, 128)], ["bf16"], [False, True], ["padding"], ["fwd", "fwd+bwd"])
    return cases


def parse_shapes(text: str, dtypes: list[str], causal: list[bool], masks: list[str],
                 modes: list[str], kv_heads: int, device: torch.device) -> list[BenchCase]:
    """A preset name or "B,H,S,D;B,H,S,D"."""
    if text in ("quick", "default", "decode"):
        return preset(text, device)
    shapes = []
    for part in text.split(";"):
        nums = [int(x) for x in part.split(",")]
        if len(nums) != 4:
            raise ValueError(f"--shapes: expected B,H,S,D;...; got {part!r}")
        shapes.append((nums[0], nums[1], nums[2], nums[3]))
    return grid(shapes, dtypes, causal, masks, modes, kv_heads)
