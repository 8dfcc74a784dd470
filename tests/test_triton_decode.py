"""The ``triton-decode`` split-KV kernel against the independent float64
reference: paged (random block tables, NaN in every slot and block it must not
read, block sizes 16, 32 and 128) and dense (views: transposed storage,
stride-0 batch, step slices of a packed projection), GQA, causal with Sq > 1,
windows, softcap, sinks, rows with no key, one and several key splits.

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``,
in one child process: the variable must be set before triton is first
imported, and must not leak into this one); on a CUDA machine the same cases
run the compiled kernel in this process.  Skipped where triton is not
installed.  The accuracy rule: error <= 2x the error of the math backend's
result in the same dtype (the same inputs) + atol.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import attention_dispatch as ad  # noqa: E402
from attention_dispatch._core.spec import validate  # noqa: E402
from attention_dispatch.adapters import _triton_splitkv as tk  # noqa: E402
from attention_dispatch.adapters.triton_decode import TritonDecodeBackend  # noqa: E402
from attention_dispatch.testing import atol, reference_attention  # noqa: E402
from _paged import make_case, max_err, paged_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _rule(got: Any, base: Any, ref: Any, dtype: torch.dtype) -> list[float]:
    """[error, bound] of the contract's rule."""
    err, err_math = max_err(got, ref), max_err(base, ref)
    return [err, 2 * err_math + atol(dtype) * (1 + ref.abs().max().item())]


def _lse(lse: Any, ref_lse: Any) -> list[float]:
    return [max_err(lse, ref_lse), 1e-3 * (1 + ref_lse.abs().max().item())]


PAGED = [  # lengths, sq, hq, hkv, d, bs, options
    ([37, 1, 16, 70], 1, 8, 2, 32, 16, dict()),
    ([130, 200, 5], 4, 4, 2, 64, 128, dict()),
    ([40, 90], 3, 6, 3, 32, 16, dict(window=(20, 0))),
    ([50, 33], 2, 4, 1, 32, 16, dict(softcap=3.0, sinks=True)),
    ([64, 17, 100], 1, 8, 8, 48, 32, dict(causal=False, window=(8, 8), sinks=True)),
]
PAGED_IDS = [f"bs{c[5]}-sq{c[1]}-{c[2]}/{c[3]}-{'-'.join(sorted(c[6]))}" for c in PAGED]


def paged_result(lengths: list[int], sq: int, hq: int, hkv: int, d: int, bs: int,
                 opts: dict, splits: int) -> dict:
    dtype = torch.float16
    case = make_case(lengths, sq, hq, hkv, d, bs, dtype=dtype, device=DEVICE, seed=len(lengths))
    causal = opts.get("causal", True)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 2 \
        if opts.get("sinks") else None
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"))
    out, lse = tk.split_kv_attention(case.q, case.k_cache, case.v_cache, scale=d ** -0.5,
                                     causal=causal, sinks=sinks, block_table=case.block_table,
                                     cache_seqlens=case.cache_seqlens, splits=splits, **kw)
    ref, ref_lse = paged_reference(case, causal=causal, sinks=sinks, **kw)
    base = ad.attention_paged(case.q.cpu(), case.k_cache.cpu(), case.v_cache.cpu(),
                              block_table=case.block_table.cpu(),
                              cache_seqlens=case.cache_seqlens.cpu(), causal=causal,
                              sinks=None if sinks is None else sinks.cpu(), backend="math",
                              **kw)
    return {"out": _rule(out, base, ref, dtype), "lse": _lse(lse, ref_lse)}


def _dense(b: int, sq: int, sk: int, hq: int, hkv: int, d: int, view: str,
           dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) as views of other storage."""
    g = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(b, sq, hq, d, generator=g).to(DEVICE, dtype)
    if view == "transposed":  # storage (B, H, S, D), read as (B, S, H, D)
        k, v = (torch.randn(b, hkv, sk, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
                for _ in range(2))
    elif view == "expanded":  # one key row broadcast over the batch (stride 0)
        k, v = (torch.randn(1, sk, hkv, d, generator=g).to(DEVICE, dtype).expand(b, -1, -1, -1)
                for _ in range(2))
    else:  # a step slice of a packed projection
        kv = torch.randn(b, 2 * sk, hkv, 2 * d, generator=g).to(DEVICE, dtype)
        k, v = kv[:, ::2, :, :d], kv[:, ::2, :, d:]
    return q, k, v


DENSE = [(2, 1, 300, 8, 2, 64, "transposed", dict()),
         (3, 5, 77, 4, 4, 32, "expanded", dict(window=(10, -1))),
         (1, 9, 4, 6, 2, 32, "slice", dict(sinks=True)),  # Sq > Sk: rows with no key
         (2, 2, 150, 8, 1, 64, "slice", dict(causal=False, softcap=5.0))]
DENSE_IDS = [f"{c[6]}-sq{c[1]}-sk{c[2]}-{'-'.join(sorted(c[7]))}" for c in DENSE]


def dense_result(b: int, sq: int, sk: int, hq: int, hkv: int, d: int, view: str,
                 opts: dict) -> dict:
    dtype = torch.float16
    q, k, v = _dense(b, sq, sk, hq, hkv, d, view, dtype)
    causal = opts.get("causal", True)
    sinks = torch.randn(hq).to(DEVICE) if opts.get("sinks") else None
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"))
    out, lse = tk.split_kv_attention(q, k, v, scale=0.3, causal=causal, sinks=sinks, **kw)
    bhsd = [t.transpose(1, 2).double().cpu() for t in (q, k, v)]
    s64 = None if sinks is None else sinks.double().cpu()
    ref, ref_lse = reference_attention(*bhsd, causal=causal, scale=0.3, sinks=s64, **kw)
    base = ad.attention(*(t.transpose(1, 2).cpu() for t in (q, k, v)), causal=causal,
                        scale=0.3, sinks=None if sinks is None else sinks.cpu(),
                        backend="math", **kw)
    res = {"out": _rule(out.transpose(1, 2), base, ref, dtype), "lse": _lse(lse, ref_lse)}
    if sq > sk:  # causal rows before the first key: out exactly 0, lse the sink
        head = torch.cat([out[:, : sq - sk].abs().flatten().float().cpu(),
                          (lse[:, :, : sq - sk].cpu() - sinks.float().cpu()[None, :, None])
                          .abs().flatten()])
        res["rows with no key"] = [head.max().item(), 0.0]
    return res


def all_results() -> dict[str, dict]:
    """Every case's [error, bound] pairs, keyed by test id."""
    out = {}
    for cid, c in zip(PAGED_IDS, PAGED):
        for splits in (1, 3):
            out[f"paged-{cid}-{splits}"] = paged_result(*c, splits=splits)
    for cid, c in zip(DENSE_IDS, DENSE):
        out[f"dense-{cid}"] = dense_result(*c)
    return out


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """Every case's result: in this process on CUDA, else in the interpreter's."""
    if CUDA:
        return all_results()
    code = ("import json, sys; sys.path[:0] = [sys.argv[1]]; import test_triton_decode as t; "
            "print('RESULTS' + json.dumps(t.all_results()))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULTS")]
    if run.returncode or not lines:
        raise AssertionError(f"interpreter run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULTS"):])


def _check(res: dict) -> None:
    for what, (err, bound) in res.items():
        assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("cid", PAGED_IDS)
def test_paged_kernel_matches_reference(results: dict, cid: str, splits: int) -> None:
    _check(results[f"paged-{cid}-{splits}"])


@pytest.mark.parametrize("cid", DENSE_IDS)
def test_dense_kernel_matches_reference(results: dict, cid: str) -> None:
    _check(results[f"dense-{cid}"])


def test_split_count_fills_the_device() -> None:
    assert tk.num_splits(1, 8, 131072, 64, 132) == 33
    assert tk.num_splits(32, 8, 8192, 64, 132) == 2
    assert tk.num_splits(32, 8, 100, 64, 132) == 1  # too few keys to split
    assert tk.num_splits(1, 1, 10, 64, 132) == 1


def _spec(**kw: Any) -> Any:
    q = torch.zeros(1, 8, 1, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 32, 64, dtype=torch.float16)
    return dataclasses.replace(validate(q, k, k), device_type="cuda", device_index=0, **kw)


@pytest.mark.parametrize("kw, words", [
    (dict(seq_q=17), "68 query rows per kv head"),
    (dict(paged=True, block_size=24), "block_size=24"),
    (dict(paged=True, block_size=8), "block_size=8"),
])
def test_limits_are_reasons(kw: dict, words: str) -> None:
    reasons = TritonDecodeBackend().check(_spec(**kw))
    assert any(words in r for r in reasons), reasons
    assert TritonDecodeBackend().check(_spec()) == []


def test_buffers_count_the_partial_outputs() -> None:
    (buf,) = TritonDecodeBackend().buffers(_spec(seq_k=131072, batch=1))
    splits = tk.num_splits(1, 2, 131072, 64, 132)
    assert buf.nbytes == 1 * 2 * splits * 16 * (64 + 1) * 4 and not buf.quadratic


def test_explain_names_it_and_its_refusal_on_the_cpu() -> None:
    q = torch.randn(1, 4, 1, 16)
    text = str(ad.explain(q, q, q, backend=["triton-decode", "math"]))
    assert "triton-decode" in text and "cuda" in text


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_offsets_past_two_to_the_31_elements() -> None:
    """A K/V view whose head stride times the head index passes 2^31 elements
    (offsets must be int64 in the kernel)."""
    sk, h, d = 16, 3, 16
    store = torch.empty(2 * 2 ** 30 + sk * d, dtype=torch.float16, device="cuda")
    kv = torch.as_strided(store, (1, sk, h, d), (0, d, 2 ** 30, 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    for i in range(h):
        kv[0, :, i] = torch.randn(sk, d, device="cuda", generator=g).half()
    q = torch.randn(1, 1, h, d, device="cuda", generator=g).half()
    out, _ = tk.split_kv_attention(q, kv, kv, scale=d ** -0.5, causal=False, splits=1)
    kc = kv.contiguous().transpose(1, 2).double()
    ref, _ = reference_attention(q.transpose(1, 2).double(), kc, kc)
    assert max_err(out.transpose(1, 2), ref.cpu()) < 1e-2
