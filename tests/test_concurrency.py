"""Threads and asyncio tasks sharing the decision cache: no cross-talk.

* 8 threads x 1000 calls, each thread with its own selection (built-in
  backends, "auto", a list, and counting backends registered for the test),
  half through ``use_backend`` and half through the ``backend=`` argument:
  every call ran on the backend its thread chose.
* 48 asyncio tasks x 40 calls interleaved by ``await asyncio.sleep(0)`` inside
  their ``use_backend`` blocks: every call ran on its task's backend.
* the first calls of 48 signatures made by 8 threads at once (the cache
  population race) give correct results and one cached plan per signature.
* a demotion made by one thread is seen by the others, without errors.

Which backend ran a call is recorded by wrapping each backend instance's
``forward`` with a recorder (thread id or asyncio task of the caller).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import threading
import warnings
from typing import Any, Callable

import pytest
import torch

import attention_dispatch as ad
from attention_dispatch._core import dispatch as _dispatch, ranking as _ranking
from attention_dispatch.testing import atol, reference_attention

N_THREADS, N_CALLS = 8, 1000
N_TASKS, N_TASK_CALLS = 48, 40
COUNTS: dict[str, int] = collections.Counter()


class Counting(ad.Backend):
    """A correct CPU backend (the float64 reference) — one registered per name."""

    capabilities = ad.Capabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.float64}),
        dropout=False,
        empty_rows_exact=True,
    )

    def forward(self, q, k, v, *, spec, mask, key_padding_mask, dropout_p, scale, **kw):
        out, lse = reference_attention(q, k, v, mask=mask, key_padding_mask=key_padding_mask,
                                       causal=spec.causal, scale=scale)
        return out.to(q.dtype), (lse.float() if spec.return_lse else None)


class Recorder:
    """Wraps the forward of backend instances; ``log[name]`` lists the caller
    identities (thread id, or the asyncio task) of every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, names: list[str],
                 who: Callable[[], Any]) -> None:
        self.log: dict[str, list[Any]] = {n: [] for n in names}
        for name in names:
            inst = ad.get_backend(name)
            monkeypatch.setattr(inst, "forward", self._wrap(name, inst.forward, who))

    def _wrap(self, name: str, fwd: Callable, who: Callable[[], Any]) -> Callable:
        log = self.log[name]

        def forward(*args: Any, **kw: Any) -> Any:
            log.append(who())  # list.append is atomic
            return fwd(*args, **kw)
        return forward

    def by_caller(self) -> dict[Any, collections.Counter]:
        out: dict[Any, collections.Counter] = collections.defaultdict(collections.Counter)
        for name, callers in self.log.items():
            for c in callers:
                out[c][name] += 1
        return out


def tiny(seed: int, shape: tuple[int, ...] = (1, 1, 4, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))


def close_to_reference(out: torch.Tensor, q, k, v, **kw: Any) -> bool:
    ref, _ = reference_attention(q, k, v, **kw)
    return (out.double() - ref).abs().max().item() <= 20 * atol(q.dtype) * (
        1 + ref.abs().max().item())


@pytest.fixture
def counting(register_temp) -> list[str]:
    names = [f"count-{i}" for i in range(4)]
    for n in names:
        register_temp(n, type(f"Counting{n[-1]}", (Counting,), {}))
    return names


def available(name: str) -> bool:
    return name in ad.list_backends() and not ad.get_backend(name).probe(torch.device("cpu"))


def choices(counting: list[str]) -> list[tuple[Any, str]]:
    """(selection, backend expected to run it) for each of the 8 threads."""
    q, k, v = tiny(0)
    sels: list[Any] = ["math", "sdpa-flash", "chunked" if available("chunked") else "math",
                       "auto", ["count-0", "auto"], counting[1], "count-2,math", counting[3]]
    out = []
    for sel in sels:
        with ad.use_backend(sel):
            out.append((sel, ad.explain(q, k, v).backend))
    assert out[3][1] == "sdpa-flash" and out[4][1] == "count-0" and out[6][1] == "count-2"
    return out


# ------------------------------------------------------------------ threads


def run_threads(fn: Callable[[int], None], n: int = N_THREADS) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_share_the_cache_without_cross_talk(monkeypatch, counting):
    plan = choices(counting)
    names = sorted({b for _, b in plan})
    rec = Recorder(monkeypatch, names, threading.get_ident)
    inputs = [tiny(0), tiny(1, (1, 2, 3, 8)), tiny(2, (2, 1, 5, 8))]
    expected_out = {}  # thread index -> results to check on a sample of calls
    idents: dict[int, int] = {}
    barrier = threading.Barrier(N_THREADS)

    def work(i: int) -> None:
        sel, _ = plan[i]
        idents[i] = threading.get_ident()
        barrier.wait()
        for n in range(N_CALLS):
            q, k, v = inputs[n % len(inputs)]
            causal = n % 5 == 0
            if n % 2:
                out = ad.attention(q, k, v, causal=causal, backend=sel)
            else:
                with ad.use_backend(sel):
                    out = ad.attention(q, k, v, causal=causal)
            if n % 97 == 0:
                assert close_to_reference(out, q, k, v, causal=causal)
                expected_out[i] = expected_out.get(i, 0) + 1

    errors = run_threads(work)
    assert not errors, errors
    calls = rec.by_caller()
    cross_talk = 0
    for i, (sel, backend) in enumerate(plan):
        got = calls[idents[i]]
        cross_talk += sum(c for name, c in got.items() if name != backend)
        assert got == {backend: N_CALLS}, (i, sel, dict(got))
    assert cross_talk == 0
    assert sum(len(v) for v in rec.log.values()) == N_THREADS * N_CALLS
    COUNTS["thread calls"] += N_THREADS * N_CALLS
    COUNTS["thread cross-talk"] += cross_talk
    COUNTS["thread results checked"] += sum(expected_out.values())


def test_a_thread_does_not_see_another_threads_use_backend(spy_backend):
    """use_backend in one thread while another thread calls with the default."""
    q, k, v = tiny(0)
    inside = threading.Event()
    leave = threading.Event()

    def holder() -> None:
        with ad.use_backend("spy"):
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(10)
    try:
        for _ in range(50):
            ad.attention(q, k, v)
        assert ad.explain(q, k, v).source == "default"
    finally:
        leave.set()
        t.join()
    assert spy_backend.calls == []


# ------------------------------------------------------------------ asyncio


def test_asyncio_tasks_share_the_cache_without_cross_talk(monkeypatch, counting):
    plan = choices(counting)
    names = sorted({b for _, b in plan})
    rec = Recorder(monkeypatch, names, lambda: id(asyncio.current_task()))
    inputs = [tiny(0), tiny(1, (1, 2, 3, 8))]
    task_expected: dict[int, str] = {}

    async def task(i: int) -> int:
        sel, backend = plan[i % len(plan)]
        task_expected[id(asyncio.current_task())] = backend
        done = 0
        with ad.use_backend(sel):
            for n in range(N_TASK_CALLS):
                q, k, v = inputs[(n + i) % len(inputs)]
                out = ad.attention(q, k, v, causal=bool(n % 3 == 0))
                if n == 0:
                    assert close_to_reference(out, q, k, v, causal=True)
                done += 1
                await asyncio.sleep(0)  # let the other tasks (other selections) run
        return done

    async def main() -> list[int]:
        return await asyncio.gather(*(task(i) for i in range(N_TASKS)))

    done = asyncio.run(main())
    assert sum(done) == N_TASKS * N_TASK_CALLS
    calls = rec.by_caller()
    assert set(calls) == set(task_expected)
    cross_talk = 0
    for tid, backend in task_expected.items():
        cross_talk += sum(c for name, c in calls[tid].items() if name != backend)
        assert calls[tid] == {backend: N_TASK_CALLS}
    assert cross_talk == 0
    COUNTS["asyncio calls"] += N_TASKS * N_TASK_CALLS
    COUNTS["asyncio cross-talk"] += cross_talk


def test_asyncio_use_backend_does_not_leak_into_sibling_tasks(spy_backend):
    q, k, v = tiny(0)

    async def selecting() -> None:
        with ad.use_backend("spy"):
            await asyncio.sleep(0.01)
            ad.attention(q, k, v)

    async def default() -> str:
        await asyncio.sleep(0)
        ad.attention(q, k, v)
        return ad.explain(q, k, v).source

    async def main() -> list[Any]:
        return await asyncio.gather(selecting(), default(), default())

    res = asyncio.run(main())
    assert res[1:] == ["default", "default"]
    assert len(spy_backend.calls) == 1


# ------------------------------------------------- cache population race


def signatures() -> list[tuple[tuple, dict]]:
    """48 signatures: shapes, dtypes, causal, masks, lse, layout."""
    out = []
    rng = random.Random(0)
    for n, (sq, sk, d, dtype, extra) in enumerate(itertools.product(
            (1, 3, 9), (4, 11), (8, 16), (torch.float32, torch.float64),
            ("plain", "causal"))):
        if n % 3 == 0:
            extra = "mask+lse"
        shape_q, shape_k = (1 + n % 2, 2, sq, d), (1 + n % 2, 1 + (n // 2) % 2, sk, d)
        out.append(((shape_q, shape_k, dtype, rng.randrange(1 << 30)), {"kind": extra}))
    return out


def make_call(sig: tuple, kind: str) -> tuple[tuple, dict]:
    shape_q, shape_k, dtype, seed = sig
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=g, dtype=dtype)
    k = torch.randn(*shape_k, generator=g, dtype=dtype)
    v = torch.randn(*shape_k, generator=g, dtype=dtype)
    kw: dict[str, Any] = {}
    if kind == "causal":
        kw["causal"] = True
    elif kind == "mask+lse":
        kw["mask"] = torch.rand(shape_q[2], shape_k[2], generator=g) > 0.4
        kw["return_lse"] = True
    return (q, k, v), kw


def test_concurrent_first_calls_of_many_signatures():
    sigs = signatures()
    calls = [make_call(s, extra["kind"]) for s, extra in sigs]
    assert len(sigs) == 48
    ad.clear_events()
    barrier = threading.Barrier(N_THREADS)
    results: dict[tuple[int, int], Any] = {}

    def work(t: int) -> None:
        order = list(range(len(calls)))
        random.Random(t).shuffle(order)
        barrier.wait()
        for i in order:
            (q, k, v), kw = calls[i]
            results[(t, i)] = ad.attention(q, k, v, **kw)

    errors = run_threads(work)
    assert not errors, errors
    assert len(results) == N_THREADS * len(calls)
    for (t, i), res in results.items():
        (q, k, v), kw = calls[i]
        out, lse = res if kw.get("return_lse") else (res, None)
        ref, ref_lse = reference_attention(q, k, v, mask=kw.get("mask"),
                                           causal=kw.get("causal", False))
        assert out.shape == ref.shape and out.dtype == q.dtype
        assert close_to_reference(out, q, k, v, mask=kw.get("mask"),
                                  causal=kw.get("causal", False)), (t, i)
        if lse is not None:
            dead = torch.isneginf(ref_lse)
            assert torch.equal(torch.isneginf(lse), dead)
            assert (lse.double() - ref_lse).masked_fill(dead, 0).abs().max() < 1e-4
    # one cached plan per signature, each the backend explain() names
    plans = list(_dispatch._plans.values())
    assert len(plans) == len(calls)
    for (q, k, v), kw in calls:
        name = ad.explain(q, k, v, **kw).backend
        assert any(p.backend.name == name and p.spec.seq_q == q.shape[2] for p in plans)
    decisions = len(ad.events("decision"))
    assert len(calls) <= decisions <= N_THREADS * len(calls)
    COUNTS["race signatures"] += len(calls)
    COUNTS["race calls"] += len(results)
    COUNTS["race decisions (>= signatures; duplicates are benign)"] += decisions


# ------------------------------------------------- demotion across threads


class AlwaysFails(Counting):
    calls = 0
    lock = threading.Lock()

    def forward(self, *a, **kw):
        with self.lock:
            type(self).calls += 1
        raise RuntimeError("kernel exploded")


@pytest.fixture
def flaky_first(register_temp, monkeypatch) -> type:
    cls = type("AlwaysFailsFresh", (AlwaysFails,), {"calls": 0})
    register_temp("flaky", cls)
    monkeypatch.setitem(_ranking.RANKINGS, "cpu", ("flaky",) + _ranking.RANKINGS["cpu"])
    ad.clear_cache()
    return cls


def test_demotion_by_one_thread_is_seen_by_the_others(flaky_first):
    q, k, v = tiny(0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        first = ad.attention(q, k, v)  # demotes flaky for this signature
        assert flaky_first.calls == 1
        barrier = threading.Barrier(N_THREADS)
        outs: list[torch.Tensor] = []

        def work(i: int) -> None:
            barrier.wait()
            for _ in range(100):
                outs.append(ad.attention(q, k, v))

        errors = run_threads(work)
    assert not errors, errors
    assert flaky_first.calls == 1  # nobody tried the demoted kernel again
    assert len(outs) == 100 * N_THREADS
    assert all(torch.equal(o, first) for o in outs)
    assert len([w for w in rec if issubclass(w.category, ad.FallbackWarning)]) == 1
    COUNTS["demotion: calls after it"] += len(outs)


def test_concurrent_failures_demote_once_and_never_fail_a_call(flaky_first):
    q, k, v = tiny(0)
    barrier = threading.Barrier(N_THREADS)
    outs: list[torch.Tensor] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")

        def work(i: int) -> None:
            barrier.wait()
            for n in range(100):
                causal = bool(n % 2)
                outs.append((causal, ad.attention(q, k, v, causal=causal)))

        errors = run_threads(work)
    assert not errors, errors
    assert len(outs) == 100 * N_THREADS
    want = {c: ad.attention(q, k, v, causal=c) for c in (False, True)}
    assert all(torch.equal(o, want[c]) for c, o in outs)
    # at most one failing call per (thread, signature) raced past the demotion
    assert 2 <= flaky_first.calls <= 2 * N_THREADS
    assert len([w for w in rec if issubclass(w.category, ad.FallbackWarning)]) == 1
    assert "demoted" in " ".join(ad.explain(q, k, v).reasons("flaky"))
    COUNTS["concurrent failures: calls"] += len(outs)
    COUNTS["concurrent failures: flaky calls"] += flaky_first.calls


def test_concurrency_counts_summary():
    """Runs last in this file: print the totals (pytest -s shows them)."""
    if not COUNTS:
        pytest.skip("run together with the tests above")
    assert COUNTS["thread cross-talk"] == 0 and COUNTS["asyncio cross-talk"] == 0
    print("\nconcurrency: " + ", ".join(f"{k}={v}" for k, v in COUNTS.items()))
