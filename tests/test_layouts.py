"""Memory layouts and padded keys: every backend, every layout a user can build.

The contract holds whatever memory is behind q, k, v and the masks: K stored
transposed (last stride != 1), stride 0 (``expand``) on any axis including
the last, step slices, storage offsets, views of a packed qkv projection in
both layouts, non-contiguous masks and key-padding masks.  Each backend
declares what its kernel reads (``Capabilities.strides``); the dispatcher
copies exactly the tensors that break it, never refuses a call for its layout
and never falls back because of it.  Keys excluded by ``key_padding_mask``
are never read: NaN or Inf stored there changes nothing.

Every check is against the float64 reference with the contract's rule
``max|backend - ref| <= 2 * max|math - ref| + atol(dtype) * (1 + max|ref|)``,
forward and gradients (where the backend declares a backward).  The same
tests run on CUDA (``-m gpu``) for the CUDA backends in bfloat16 and float16.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch.testing.memory import split_packed
from attention_dispatch.testing import atol, memory_view, packed_qkv, reference_attention

Tensor = torch.Tensor
CUDA = torch.cuda.is_available()

CPU_BACKENDS = ("math", "sdpa-flash", "chunked", "flex", "sdpa")
CUDA_BACKENDS = ("math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "flash-attn",
                 "xformers", "flex", "sdpa")

# (which tensors, memory kind, axis): the layouts of the contract's promise
VIEWS = [
    ("k", "transposed", -2),   # K stored transposed: k.stride(-1) == Sk
    ("v", "expand", -1),       # V broadcast along the head dim (stride 0, last axis)
    ("qkv", "step", -1),       # x[..., ::2]
    ("q", "step", 2),          # step slice along the sequence
    ("k", "expand", 0),        # stride 0 on the batch axis
    ("v", "expand", 1),        # ... the head axis
    ("k", "expand", 2),        # ... the sequence axis
    ("qkv", "offset", -1),     # storage offset of one element
    ("qkv", "transposed", -2),
]
VIEW_IDS = [f"{w}-{k}{a}" for w, k, a in VIEWS]


def _backends(device: str) -> list[str]:
    return list(CPU_BACKENDS if device == "cpu" else CUDA_BACKENDS)


def _runs(device: str, without_flex: bool = False) -> Iterator[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to check on ``device``: the usable backends and the
    device's test dtypes each declares (``without_flex``: flex left out)."""
    for backend in _backends(device):
        if without_flex and backend == "flex":
            continue
        try:
            _usable(backend, device)
        except pytest.skip.Exception:
            continue
        for dtype in _dtypes(device):
            if dtype in ad.get_backend(backend).capabilities.dtypes:
                yield backend, dtype


def _usable(name: str, device: str) -> None:
    if name not in ad.list_backends():
        pytest.skip(f"{name} is not registered")
    reasons = ad.get_backend(name).probe(torch.device(device))
    if reasons:
        assert name != "math", reasons
        pytest.skip(f"{name} unavailable on {device}: {'; '.join(reasons)}")


@pytest.fixture
def flex_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """flex refuses small CPU calls (compile time); these tests want it to run."""
    if "flex" in ad.list_backends():
        inst = ad.get_backend("flex")
        if hasattr(inst, "min_cpu_scores"):
            monkeypatch.setattr(inst, "min_cpu_scores", 0)


def _leaves(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str,
            seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(device=device, dtype=dtype) for n, s in shapes.items()}


def _shapes(layout: str, b: int, hq: int, hkv: int, sq: int, sk: int, d: int
            ) -> dict[str, tuple[int, ...]]:
    def sh(h: int, s: int) -> tuple[int, ...]:
        return (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    return {"q": sh(hq, sq), "k": sh(hkv, sk), "v": sh(hkv, sk)}


def _bhsd(t: Tensor, layout: str) -> Tensor:
    return t.transpose(1, 2) if layout == "bshd" else t


def _call(backend: str, qkv: dict[str, Tensor], layout: str, grad: bool,
          go: Optional[Tensor], **kw: Any) -> list[Tensor]:
    """[out, dq, dk, dv] (bhsd) of one call on views of fresh leaves."""
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in qkv["_base"].items()}
    views = {n: qkv["_make"][n](leaves[n]) for n in "qkv"}
    for t in views.values():
        if grad:
            t.retain_grad()
    out = ad.attention(views["q"], views["k"], views["v"], layout=layout, backend=backend, **kw)
    res = [_bhsd(out, layout).detach()]
    if grad:
        out.backward(go if layout == "bhsd" else go.transpose(1, 2))
        res += [_bhsd(views[n].grad, layout) for n in "qkv"]
    return res


def _reference(qkv: dict[str, Tensor], layout: str, grad: bool, go: Optional[Tensor],
               **kw: Any) -> list[Tensor]:
    views = {n: _bhsd(qkv["_make"][n](qkv["_base"][n]), layout).detach().double()
             .requires_grad_(grad) for n in "qkv"}
    out, _ = reference_attention(views["q"], views["k"], views["v"], **kw)
    res = [out.detach()]
    if grad:
        out.backward(go.double())
        res += [views[n].grad for n in "qkv"]
    return res


def _check(got: list[Tensor], base: list[Tensor], ref: list[Tensor], dtype: torch.dtype) -> None:
    for name, a, m, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        err = (a.double() - r).abs().max().item()
        em = (m.double() - r).abs().max().item()
        slack = atol(dtype) * (1 + r.abs().max().item())
        bound = slack if dtype == torch.float64 else 2 * em + slack
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (math {em:.3g})"


def _case(which: str, kind: str, axis: int, layout: str, dtype: torch.dtype, device: str,
          sq: int = 24, sk: int = 40, d: int = 16, seed: int = 0) -> dict[str, Any]:
    base = _leaves(_shapes(layout, 2, 4, 2, sq, sk, d), dtype, device, seed)
    make = {n: (lambda t, k=kind: memory_view(t, k, axis)) if n in which
            else (lambda t: t) for n in "qkv"}
    return {"_base": base, "_make": make}


def _run_case(backend: str, qkv: dict[str, Any], layout: str, dtype: torch.dtype,
              device: str, **kw: Any) -> None:
    inst = ad.get_backend(backend)
    grad = inst.capabilities.backward
    shape = _bhsd(qkv["_make"]["q"](qkv["_base"]["q"]), layout).shape
    g = torch.Generator().manual_seed(1)
    go = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    try:
        got = _call(backend, qkv, layout, grad, go, **kw)
    except ad.BackendUnavailable as exc:
        if not grad:
            pytest.skip(f"{backend} refuses: {exc.reasons.get(backend)}")
        grad = False  # refused with gradients (declared): check the forward
        try:
            got = _call(backend, qkv, layout, grad, go, **kw)
        except ad.BackendUnavailable as exc2:
            pytest.skip(f"{backend} refuses: {exc2.reasons.get(backend)}")
    base = _call("math", qkv, layout, grad, go, **kw)
    _check(got, base, _reference(qkv, layout, grad, go, **kw), dtype)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float64] if device == "cpu" else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", VIEWS, ids=VIEW_IDS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_views_match_the_reference(device: str, view: tuple, layout: str, causal: bool,
                                   flex_small: None) -> None:
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")
    which, kind, axis = view
    # flex compiles per shape on the CPU: a few cases are enough
    for backend, dtype in _runs(device, device == "cpu" and (causal or layout == "bshd")):
        qkv = _case(which, kind, axis, layout, dtype, device)
        try:
            _run_case(backend, qkv, layout, dtype, device, causal=causal)
        except pytest.skip.Exception:
            continue
        except AssertionError as exc:
            raise AssertionError(f"{backend} {dtype} {view} {layout}: {exc}") from exc


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_packed_qkv_projection(device: str, layout: str) -> None:
    """q, k, v as views of one fused projection output, both layouts."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")
    for backend, dtype in _runs(device, without_flex=device == "cpu"):
        packed, _ = packed_qkv(2, 32, 4, 16, layout, dtype=dtype, device=device,
                               generator=torch.Generator().manual_seed(3))

        def part(i: int) -> Any:
            def make(p: Tensor) -> Tensor:
                return split_packed(p, 4, layout)[i]
            return make

        qkv = {"_base": {"q": packed, "k": packed, "v": packed},
               "_make": {"q": part(0), "k": part(1), "v": part(2)}}
        try:
            _run_case(backend, qkv, layout, dtype, device, causal=True)
        except pytest.skip.Exception:
            continue


# ------------------------------------------------------------- same backend


def test_transposed_k_runs_on_the_same_backend_with_one_copy() -> None:
    """A K stored transposed is copied once for the kernel; no refusal, no
    fallback, no demotion, and explain() says what is copied and why."""
    q = torch.randn(1, 2, 32, 16)
    k = torch.randn(1, 2, 16, 32).transpose(-1, -2)   # (1, 2, 32, 16), last stride 32
    v = torch.randn(1, 2, 32, 16)
    plain = ad.explain(q, k.contiguous(), v)
    d = ad.explain(q, k, v)
    assert d.backend == plain.backend
    assert plain.copies == ()
    if d.backend != "math":  # math reads any strides
        assert len(d.copies) == 1 and d.copies[0].startswith("copy of k"), d.copies
        assert "last-dim stride 32" in d.copies[0]
    ad.clear_events()
    out = ad.attention(q, k, v)
    ref, _ = reference_attention(q, k, v)
    assert (out.double() - ref).abs().max().item() < 1e-5
    assert not [e for e in ad.events() if e.kind != "decision"], ad.events()


def test_pointer_alignment_under_torch_compile(register_temp: Any) -> None:
    """A backend with a pointer-alignment rule (the fused CUDA kernels') under
    torch.compile(fullgraph=True): no data pointer exists while tracing, so the
    graph's tensors count as aligned (the documented limit: a graph input
    starting off a 16-byte boundary is not copied there); eager calls read the
    pointer."""
    from attention_dispatch._core.layout import StrideRequirements

    req = StrideRequirements(pointer_alignment=16)

    class Aligned(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}))

        def stride_requirements(self, spec: Any) -> StrideRequirements:
            return req

        def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale):
            out, _ = reference_attention(q, k, v, scale=scale)
            return out.to(q.dtype), None

    register_temp("aligned-spy", Aligned)
    base = torch.randn(2 * 2 * 8 * 16 + 4)
    aligned, off = base[:-4].view(2, 2, 8, 16), base[1:-3].view(2, 2, 8, 16)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: ad.attention(q, k, v, backend="aligned-spy"),
                      backend="eager", fullgraph=True)
    for q in (aligned, off):  # the spy computes the reference: right either way
        out = f(q, k, v)
        assert (out.double() - reference_attention(q, k, v)[0]).abs().max().item() < 1e-5
    assert not req.misaligned(aligned) and req.misaligned(off)  # eager: the pointer


def test_layout_checks_are_decided_once_per_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stride rule is judged when a signature is first seen, not per call."""
    from attention_dispatch._core import layout as _layout

    calls = []
    real = _layout.plan_memory
    monkeypatch.setattr(_layout, "plan_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    import attention_dispatch._core.binding as binding

    monkeypatch.setattr(binding, "plan_memory", _layout.plan_memory)
    q, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 2, 16, 8).transpose(-1, -2)
    for _ in range(5):
        ad.attention(q, k, v)
    assert len(calls) == 1
    ad.attention(q, k.contiguous(), v)  # other strides: another signature
    assert len(calls) == 2


# ------------------------------------------------------------ masks as views


def test_broadcast_mask_reaches_the_kernel_compact() -> None:
    """A stride-0 (expanded) mask is never materialised at (B, H, Sq, Sk)."""
    seen = []

    class MaskSpy(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}), empty_rows_exact=True)

        def forward(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
            seen.append(tuple(kw["mask"].shape))
            return ad.get_backend("math").forward(q, k, v, **kw)

    ad.register_backend("mask-spy")(MaskSpy)
    try:
        q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
        small = torch.rand(1, 1, 8, 12) > 0.3
        small[..., 0] = True
        mask = small.expand(2, 4, 8, 12)
        out = ad.attention(q, k, v, mask=mask, backend="mask-spy")
    finally:
        ad.unregister_backend("mask-spy")
    assert seen == [(1, 1, 8, 12)]
    ref, _ = reference_attention(q, k, v, mask=mask)
    assert (out.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_mask_and_padding_views(device: str, mask_kind: str, flex_small: None) -> None:
    """Transposed and expanded masks, key-padding masks that are step slices."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(5)
    for backend, dtype in _runs(device):
        q, k, v = (torch.randn(2, 4, s, 16, generator=g).to(device, dtype)
                   for s in (8, 12, 12))
        raw = torch.randn(2, 4, 12, 8, generator=g)
        mask = (raw > -0.5) if mask_kind == "bool" else raw.to(dtype)
        mask = mask.to(device).transpose(-1, -2)              # (2, 4, 8, 12), last stride 8
        kpm = (torch.rand(2, 24, generator=g) > 0.3).to(device)[:, ::2]  # step slice
        kpm[:, 0] = True
        try:
            out = ad.attention(q, k, v, mask=mask, key_padding_mask=kpm, backend=backend)
        except ad.BackendUnavailable:
            continue
        m = ad.attention(q, k, v, mask=mask, key_padding_mask=kpm, backend="math")
        ref, _ = reference_attention(q, k, v, mask=mask, key_padding_mask=kpm)
        _check([out], [m], [ref], dtype)


# ------------------------------------------------------------ padded keys


def _poisoned(device: str, dtype: torch.dtype, scattered: bool, seed: int = 7
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, s, 16, generator=g) for s in (10, 24, 24))
    if scattered:
        kpm = torch.rand(3, 24, generator=g) > 0.4
        kpm[:, 3] = True
    else:
        kpm = torch.arange(24)[None, :] < torch.tensor([24, 17, 5])[:, None]
    pad = ~kpm[:, None, :, None]
    k = k.masked_fill(pad & (torch.rand(k.shape, generator=g) < 0.5), float("nan"))
    k = k.masked_fill(pad & (torch.rand(k.shape, generator=g) < 0.3), float("inf"))
    v = v.masked_fill(pad & (torch.rand(v.shape, generator=g) < 0.5), float("inf"))
    v = v.masked_fill(pad & (torch.rand(v.shape, generator=g) < 0.3), float("nan"))
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), kpm.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scattered", [False, True], ids=["prefix", "scattered"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_poisoned_padding_is_never_read(device: str, scattered: bool, causal: bool,
                                        flex_small: None) -> None:
    """NaN and Inf in padded K and V slots change neither the output nor any
    gradient; the gradients of the padded slots are 0."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA device")
    ran = []
    for backend, dtype in _runs(device):
        q, k, v, kpm = _poisoned(device, dtype, scattered)
        if _poison_one(backend, q, k, v, kpm, causal, dtype):
            ran.append((backend, dtype))
    assert any(b == "math" for b, _ in ran)


def _poison_one(backend: str, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, causal: bool,
                dtype: torch.dtype) -> bool:
    grad = ad.get_backend(backend).capabilities.backward
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.device, dtype)
    clean = ~kpm[:, None, :, None]
    kc, vc = k.masked_fill(clean, 0), v.masked_fill(clean, 0)

    def run(name: str, grad_: bool) -> list[Tensor]:
        t = [x.detach().clone().requires_grad_(grad_) for x in (q, k, v)]
        out = ad.attention(*t, key_padding_mask=kpm, causal=causal, backend=name)
        if not grad_:
            return [out.detach()]
        out.backward(go)
        return [out.detach()] + [x.grad for x in t]

    try:
        got = run(backend, grad)
    except ad.BackendUnavailable:
        try:
            grad, got = False, run(backend, False)
        except ad.BackendUnavailable:
            return False
    base = run("math", grad)
    leaves = [x.detach().double().requires_grad_(grad) for x in (q, kc, vc)]
    out, _ = reference_attention(*leaves, key_padding_mask=kpm, causal=causal)
    ref = [out.detach()]
    if grad:
        out.backward(go.double())
        ref += [x.grad for x in leaves]
        for gr in got[2:]:
            assert torch.isfinite(gr).all(), f"{backend}: non-finite gradient"
            assert not gr.masked_select(clean.expand_as(gr)).any(), f"{backend}: padded grad"
    try:
        _check(got, base, ref, dtype)
    except AssertionError as exc:
        raise AssertionError(f"{backend} {dtype} causal={causal}: {exc}") from exc
    return True


# ------------------------------------------------------------ packed varlen


@pytest.mark.parametrize("kind", ["transposed", "step", "offset", "expand"])
def test_varlen_views_reach_the_kernel_in_memory_it_reads(kind: str) -> None:
    """attention_varlen: packed (T, H, D) views reach a native varlen kernel only
    in memory its stride rule allows (a strict CPU kernel that checks its inputs)."""
    from attention_dispatch._core.layout import StrideRequirements
    from attention_dispatch.testing import reference_varlen

    rule = StrideRequirements(stride_alignment=16, pointer_alignment=16, broadcast=False)

    class StrictVarlen(ad.Backend):
        capabilities = ad.Capabilities(device_types=frozenset({"cpu"}),
                                       dtypes=frozenset({torch.float32}), varlen=True,
                                       strides=rule, empty_rows_exact=True)

        def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Any:
            for t in (q, k, v):
                if rule.violation(t) or rule.misaligned(t):
                    raise AssertionError(f"strides {t.stride()} reached the kernel")
            return ad.get_backend("math").forward_varlen(q, k, v, **kw)

    ad.register_backend("strict-varlen")(StrictVarlen)
    try:
        g = torch.Generator().manual_seed(9)
        cu = torch.tensor([0, 37, 101, 128], dtype=torch.int32)
        q, k, v = (torch.randn(128, 2, 16, generator=g) for _ in range(3))
        k = memory_view(k, kind, 0)  # "transposed": (D, H, T) storage, last stride 256
        out = ad.attention_varlen(q, k, v, cu, cu, 64, 64, causal=True, backend="strict-varlen")
    finally:
        ad.unregister_backend("strict-varlen")
    ref, _ = reference_varlen(q, k, v, cu, cu, causal=True)
    assert (out.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("store", ["bshd", "packed", "bhsd", "expanded"])
def test_cleaning_copy_keeps_the_callers_axis_order(store: str) -> None:
    """The masked copy of K (padded slots zeroed) is laid out in K's own order
    of heads and sequence, so its gradient reaches a bshd or packed K without
    a transposing copy; values and gradients are those of the plain masked copy."""
    from attention_dispatch._core.layout import clean_padded

    g = torch.Generator().manual_seed(7)
    b, s, h, d = 2, 12, 3, 8
    if store == "packed":
        t = torch.randn(b, s, 3, h, d, generator=g).unbind(2)[1].transpose(1, 2)
    elif store == "bshd":
        t = torch.randn(b, s, h, d, generator=g).transpose(1, 2)
    elif store == "expanded":
        t = torch.randn(b, 1, s, d, generator=g).expand(b, h, s, d)
    else:
        t = torch.randn(b, h, s, d, generator=g)
    t = t.detach().requires_grad_()
    kpm = torch.rand(b, s, generator=g) > 0.4
    kpm[:, 0] = True
    if store != "expanded":  # NaN in the padded slots (an expanded tensor has one slot per key)
        t.data.masked_fill_(~kpm[:, None, :, None], float("nan"))
    out = clean_padded(t, kpm, False)
    want = t.detach().masked_fill(~kpm[:, None, :, None], 0)
    assert torch.equal(out.detach(), want)
    assert out.stride(-1) == 1
    bshd_order = store in ("bshd", "packed")
    assert (out.stride(1) < out.stride(2)) == bshd_order
    go = torch.randn(out.shape, generator=g)
    out.backward(go)
    assert torch.equal(t.grad, go.masked_fill(~kpm[:, None, :, None], 0))
