"""Time every backend side by side on CUDA, through ``ad.attention(..., backend=name)``.

Each row times every forced backend, ``backend="auto"`` and torch's default
call (the call a user makes without this package: ``F.scaled_dot_product_attention``
with the equivalent arguments) with CUDA events: warm-up, then the median of N
repeats in interleaved rounds.  bfloat16, head dim 128.

(a) long: B*S = 16384 tokens (B=1 S=16384, and other B x S splits), H=16,
    causal and non-causal, fwd and fwd+bwd; TFLOP/s = 4*B*H*Sq*Sk*D / t for
    fwd (half that for causal), 2.5x the fwd FLOPs for fwd+bwd; torch default
    = F.sdpa(is_causal=causal) (Sq == Sk: top-left is bottom-right).
(b) key padding: B=4, S=8192, H=16, rows 2 and 3 with half their keys padded;
    torch default = F.sdpa with the equivalent bool attn_mask.
(c) decode: B in {1, 8, 32}, Hq=32, Hkv=8, Sq=1, Sk in {4k, 32k, 128k};
    torch default = F.sdpa(enable_gqa=True).  L2 is flushed before every timed
    call (a write of 512 MiB), and the row has a bandwidth ceiling measured in
    the same run: a read-only pass (a sum) over a buffer of the bytes of K+V;
    ``ceiling`` is its time, ``<name>/ceiling`` the achieved fraction of it
    (the ceiling's time over the call's).  ``--decode-timing queued``
    (default) issues each call while the flush still runs, so the events time
    its device work with a cold L2 (a decode loop's host runs ahead);
    ``alone`` times it from an idle GPU, host latency included
    (bench/decode_profile.py reports both, with host and kernel times).

``auto/best`` is the fastest forced backend's time over auto's (a throughput
ratio: 1.0 means auto ran the best kernel; the goal is >= 0.97);
``auto/torch`` is torch's default call's time over auto's (> 1: auto is faster).
Runs with a temporary autotune cache: stored choices never change a figure.
Usage::

    python bench/gpu_bench.py --out bench-results.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import attention_dispatch as ad

DEFAULT_BACKENDS = "flash-attn,xformers,sdpa-cudnn,sdpa-flash,sdpa-mem-efficient,triton-decode"
Tensor = torch.Tensor


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def make(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, layout: str,
         grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Random bfloat16 q, k, v on CUDA in ``layout``."""
    def rnd(h: int, s: int) -> Tensor:
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    return rnd(hq, sq), rnd(hkv, sk), rnd(hkv, sk)


def runner(name: str, q: Tensor, k: Tensor, v: Tensor, kw: dict, bwd: bool
           ) -> Callable[[], Any]:
    """A closure running one attention call (and its backward when ``bwd``)."""
    def fwd() -> Tensor:
        return ad.attention(q, k, v, backend=name, **kw)

    if not bwd:
        return fwd
    grad = torch.randn_like(fwd())
    return lambda: torch.autograd.grad(fwd(), (q, k, v), grad)


_FLUSH: list[Tensor] = []


def flush_l2() -> None:
    """Evict the L2 cache: write a 512 MiB buffer (outside the timed events)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(512 << 20, dtype=torch.uint8, device="cuda"))
    _FLUSH[0].zero_()


def time_one(fn: Callable[[], Any], flush: bool, queued: bool = False) -> float:
    """Milliseconds of one call (CUDA events), after an L2 flush when ``flush``.
    From an idle GPU (host latency counted), or, when ``queued``, issued
    while the flush still runs: the events then time the call's device work
    with a cold L2, as in a decode loop whose host runs ahead of the GPU (the
    call's host time is hidden up to the flush's, about 150 us)."""
    if not (flush and queued):
        if flush:
            flush_l2()
        return time_ms(fn, 0, 1)
    torch.cuda.synchronize()
    flush_l2()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, flush: bool,
                queued: bool = False) -> dict[str, float]:
    """Median milliseconds of each function over ``repeats`` rounds, in a fresh
    random order per round (no entry always follows the same, e.g. power-hungry,
    kernel), the L2 flushed before each call when ``flush`` (see
    :func:`time_one` for ``queued``)."""
    samples: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for n in order:
            samples[n].append(time_one(fns[n], flush, queued))
    return {n: statistics.median(t) for n, t in samples.items()}


def measure(names: list[str], q: Tensor, k: Tensor, v: Tensor, kw: dict, bwd: bool,
            args: argparse.Namespace, torch_default: Optional[Callable[[], Any]] = None,
            extra: Optional[dict[str, Callable[[], Any]]] = None, flush: bool = False,
            queued: bool = False) -> dict[str, Any]:
    """{backend: ms or "refused: ..." / "error: ..."}, plus auto's choice and torch's
    default.  Every runnable entry is warmed up, then all are timed in interleaved
    rounds (CUDA events, median per entry), so clock drift hits them alike."""
    res: dict[str, Any] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name in names + ["auto"]:
        try:
            fn = runner(name, q, k, v, kw, bwd)
            for _ in range(args.warmup):
                fn()
            fns[name] = fn
        except ad.BackendUnavailable as exc:
            res[name] = "refused: " + "; ".join(exc.reasons.get(name, ["?"]))
        except Exception as exc:  # one broken backend must not stop the run
            res[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if torch_default is not None:
        try:
            for _ in range(args.warmup):
                torch_default()
            fns["torch-default"] = torch_default
        except Exception as exc:  # e.g. out of memory for a dense mask
            res["torch-default"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    fns.update(extra or {})
    res.update(interleaved(fns, args.repeats, flush, queued))
    torch.cuda.empty_cache()
    res["auto_choice"] = ad.explain(q, k, v, **kw).backend
    best = [res[n] for n in names if isinstance(res.get(n), float)]
    if best and isinstance(res.get("auto"), float):
        res["auto/best"] = min(best) / res["auto"]  # throughput ratio: 1.0 = auto is the best
    if isinstance(res.get("torch-default"), float) and isinstance(res.get("auto"), float):
        res["auto/torch"] = res["torch-default"] / res["auto"]  # > 1: auto is faster
    return res


def bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def sdpa_runner(q: Tensor, k: Tensor, v: Tensor, layout: str, bwd: bool, **kw: Any
                ) -> Callable[[], Any]:
    """torch's default call on the same tensors (and its backward when ``bwd``)."""
    qb, kb, vb = (bhsd(t, layout) for t in (q, k, v))

    def fwd() -> Tensor:
        return F.scaled_dot_product_attention(qb, kb, vb, **kw)

    if not bwd:
        return fwd
    grad = torch.randn_like(fwd())
    return lambda: torch.autograd.grad(fwd(), (q, k, v), grad)


def torch_choice(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> str:
    """The kernel F.scaled_dot_product_attention picks for bhsd q, k, v (private API)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, **kw)).name
    except Exception as exc:  # private: may change between torch versions
        return f"unknown ({type(exc).__name__})"


def long_rows(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        for causal in (False, True):
            for bwd in (False, True):
                q, k, v = make(b, 16, 16, s, s, 128, args.layout, bwd)
                res = measure(names, q, k, v, dict(causal=causal, layout=args.layout), bwd, args,
                              sdpa_runner(q, k, v, args.layout, bwd, is_causal=causal))
                res["torch_choice"] = torch_choice(*(bhsd(t, args.layout) for t in (q, k, v)),
                                                   is_causal=causal)
                flops = 4 * b * 16 * s * s * 128 * (0.5 if causal else 1.0) * (2.5 if bwd else 1.0)
                res["tflops"] = {n: flops / (t * 1e-3) / 1e12 for n, t in res.items()
                                 if isinstance(t, float) and "/" not in n}
                rows.append(dict(section="long", B=b, S=s, H=16, D=128, causal=causal,
                                 pass_="fwd+bwd" if bwd else "fwd", **res))
                del q, k, v
    return rows


def padding_rows(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    b, s = 4, 8192
    kpm = torch.ones(b, s, dtype=torch.bool, device="cuda")
    kpm[b // 2:, s // 2:] = False
    rows = []
    for bwd in (False, True):
        q, k, v = make(b, 16, 16, s, s, 128, args.layout, bwd)
        qb, kb, vb = (bhsd(t, args.layout) for t in (q, k, v))
        res = measure(names, q, k, v, dict(key_padding_mask=kpm, layout=args.layout), bwd, args,
                      sdpa_runner(q, k, v, args.layout, bwd, attn_mask=kpm[:, None, None, :]))
        res["torch_choice"] = torch_choice(qb, kb, vb, attn_mask=kpm[:, None, None, :])
        rows.append(dict(section="key-padding", B=b, S=s, H=16, D=128, causal=False,
                         pass_="fwd+bwd" if bwd else "fwd", **res))
    return rows


def decode_rows(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """Decode (Sq=1, GQA 32/8) over the B x Sk grid of ``--decode``, with the
    bandwidth ceiling of each row measured beside it."""
    rows = []
    for shape in args.decode.split(","):
        b, sk = (int(x) for x in shape.split("x"))
        q, k, v = make(b, 32, 8, 1, sk, 128, args.layout, False)
        qb, kb, vb = (bhsd(t, args.layout) for t in (q, k, v))
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
        ceiling = {"ceiling": lambda buf=buf: buf.sum(dtype=torch.float32)}  # reads K+V once
        res = measure(names, q, k, v, dict(layout=args.layout), False, args,
                      sdpa_runner(q, k, v, args.layout, False, enable_gqa=True), ceiling,
                      flush=True, queued=args.decode_timing == "queued")
        res["torch_choice"] = torch_choice(qb, kb, vb, enable_gqa=True)
        if isinstance(res.get("ceiling"), float):
            res["kv_GB"] = nbytes / 1e9
            res["ceiling_GBps"] = nbytes / (res["ceiling"] * 1e-3) / 1e9
            for n in names + ["auto", "torch-default"]:
                if isinstance(res.get(n), float):
                    res[f"{n}/ceiling"] = res["ceiling"] / res[n]
        rows.append(dict(section="decode", B=b, Hq=32, Hkv=8, Sq=1, Sk=sk, D=128, pass_="fwd",
                         **res))
        del q, k, v, buf
        torch.cuda.empty_cache()
    return rows


def fmt(v: Any, unit: str) -> str:
    if isinstance(v, float):
        return f"{v * 1000:.0f}us" if unit == "us" else f"{v:.2f}ms"
    return "refused" if str(v).startswith("refused") else "error"


def print_table(rows: list[dict[str, Any]], names: list[str]) -> None:
    cols = names + ["auto", "torch-default"]
    print("row".ljust(38) + "".join(c[:12].rjust(13) for c in cols)
          + "  auto/best  auto/torch  auto->")
    for r in rows:
        unit = "us" if r["section"] == "decode" else "ms"
        label = f"{r['section']} B={r['B']} " + (f"S={r['S']} " if "S" in r else "") + \
            (f"Sk={r['Sk']} " if "Sk" in r else "") + ("causal " if r.get("causal") else "") + \
            r["pass_"]
        cells = "".join(fmt(r[c], unit).rjust(13) if c in r else "-".rjust(13) for c in cols)
        ratio = f"{r['auto/best']:.2f}" if "auto/best" in r else "-"
        vs_torch = f"{r['auto/torch']:.2f}" if "auto/torch" in r else "-"
        torch_pick = f" (torch: {r['torch_choice']})" if "torch_choice" in r else ""
        print(label.ljust(38) + cells + ratio.rjust(11) + vs_torch.rjust(12)
              + f"  {r['auto_choice']}{torch_pick}")
        if "tflops" in r:
            print(" " * 38 + "".join((f"{r['tflops'][c]:.0f}TF" if c in r["tflops"] else "")
                                     .rjust(13) for c in cols))
        if "ceiling" in r and isinstance(r["ceiling"], float):
            print(" " * 38 + "".join((f"{r[c + '/ceiling']:.0%}bw" if c + "/ceiling" in r
                                      else "").rjust(13) for c in cols)
                  + f"   ceiling {fmt(r['ceiling'], 'us')} = {r['ceiling_GBps']:.0f} GB/s")


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-bench.json", help="JSON results path")
    p.add_argument("--backends", default=DEFAULT_BACKENDS)
    p.add_argument("--shapes", default="1x16384,4x4096,16x1024", help="BxS for section (a)")
    p.add_argument("--layout", default="bshd", choices=("bshd", "bhsd"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sections", default="long,padding,decode")
    p.add_argument("--decode", default="1x4096,8x4096,32x4096,1x32768,8x32768,32x32768,"
                   "1x131072,8x131072,32x131072", help="B x Sk for section (c)")
    p.add_argument("--decode-timing", default="queued", choices=("queued", "alone"),
                   help="section (c): each call issued behind the L2 flush (device time, "
                        "cold L2) or from an idle GPU (host latency counted)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    names = [n for n in args.backends.split(",") if n]
    sections = {"long": long_rows, "padding": padding_rows, "decode": decode_rows}
    rows = [r for s in args.sections.split(",") for r in sections[s](args, names)]
    print_table(rows, names)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                cuda=torch.version.cuda, layout=args.layout, dtype="bfloat16",
                repeats=args.repeats, warmup=args.warmup, decode_timing=args.decode_timing,
                describe={n: ad.get_backend(n).describe() for n in names})
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from attention_dispatch._core.autotuning import isolated_cache

    with isolated_cache():  # stored tuning decisions neither apply nor change
        sys.exit(main())
