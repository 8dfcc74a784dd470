"""Every bad input gets a typed error naming the argument, before any kernel runs.

AttentionInputError is a ValueError; AttentionTypeError is also a TypeError.
A spy backend (selected with use_backend) records forward calls, and every
other backend's forward is patched to fail, so a kernel reached by a bad
call is caught either way.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import attention_dispatch as ad

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 5, 7, 8


def base() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(B, HQ, SQ, D, generator=g),
                k=torch.randn(B, HKV, SK, D, generator=g),
                v=torch.randn(B, HKV, SK, D, generator=g))


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


TypeErr, InErr, Unknown = ad.AttentionTypeError, ad.AttentionInputError, ad.UnknownBackendError

# (id, change to the base call, error class, argument, text in the message)
CASES: list[tuple[str, Callable[[dict], dict], type, str, str]] = [
    ("q-not-tensor", lambda c: {"q": [[1.0]]}, TypeErr, "q", "torch.Tensor"),
    ("k-none", lambda c: {"k": None}, TypeErr, "k", "NoneType"),
    ("v-float", lambda c: {"v": 1.0}, TypeErr, "v", "float"),
    ("q-3d", lambda c: {"q": c["q"][0]}, InErr, "q", "3-D"),
    ("v-5d", lambda c: {"v": c["v"][None]}, InErr, "v", "4-D"),
    ("q-int-dtype", lambda c: {k: c[k].long() for k in "qkv"}, TypeErr, "q", "int64"),
    ("q-bool-dtype", lambda c: {"q": c["q"] > 0}, TypeErr, "q", "torch.bool"),
    ("k-dtype-differs", lambda c: {"k": c["k"].double()}, TypeErr, "k", "float64"),
    ("v-dtype-differs", lambda c: {"v": c["v"].half()}, TypeErr, "v", "float16"),
    ("k-device-differs", lambda c: {"k": meta(B, HKV, SK, D)}, InErr, "k", "meta"),
    ("v-device-differs", lambda c: {"v": meta(B, HKV, SK, D)}, InErr, "v", "meta"),
    ("batch-mismatch", lambda c: {"k": c["k"][:1], "v": c["v"][:1]}, InErr, "k", "batch"),
    ("head-dim-mismatch", lambda c: {"k": torch.randn(B, HKV, SK, D + 8)}, InErr, "k",
     "head dim"),
    ("v-seq-mismatch", lambda c: {"v": torch.randn(B, HKV, SK - 1, D)}, InErr, "v", "S=7"),
    ("v-heads-mismatch", lambda c: {"v": torch.randn(B, HQ, SK, D)}, InErr, "v", "H=2"),
    ("heads-not-divisible", lambda c: {"k": torch.randn(B, 3, SK, D),
                                       "v": torch.randn(B, 3, SK, D)}, InErr, "k", "3 heads"),
    ("head-dim-zero", lambda c: {"q": torch.randn(B, HQ, SQ, 0), "k": torch.randn(B, HKV, SK, 0),
                                 "v": torch.randn(B, HKV, SK, 0)}, InErr, "q", "head dim"),
    ("bshd-heads-not-divisible", lambda c: {"layout": "bshd", "q": torch.randn(B, SQ, 4, D),
                                            "k": torch.randn(B, SK, 3, D),
                                            "v": torch.randn(B, SK, 3, D)}, InErr, "k", "heads"),
    ("mask-wrong-shape", lambda c: {"mask": torch.ones(SQ, SK - 1, dtype=torch.bool)}, InErr,
     "mask", "broadcastable"),
    ("mask-1d", lambda c: {"mask": torch.ones(SK, dtype=torch.bool)}, InErr, "mask",
     "key_padding_mask="),
    ("mask-5d", lambda c: {"mask": torch.ones(1, B, HQ, SQ, SK, dtype=torch.bool)}, InErr,
     "mask", "(2, 4, 5, 7)"),
    ("mask-batch-as-padding", lambda c: {"mask": torch.ones(B, SK, dtype=torch.bool)}, InErr,
     "mask", "broadcastable"),
    ("mask-int-dtype", lambda c: {"mask": torch.ones(SQ, SK, dtype=torch.int32)}, TypeErr,
     "mask", "int32"),
    ("mask-not-tensor", lambda c: {"mask": [[True] * SK] * SQ}, TypeErr, "mask", "list"),
    ("mask-wrong-device", lambda c: {"mask": meta(SQ, SK, dtype=torch.bool)}, InErr, "mask",
     "meta"),
    ("kpm-wrong-shape", lambda c: {"key_padding_mask": torch.ones(B, SK + 1, dtype=torch.bool)},
     InErr, "key_padding_mask", "(2, 8)"),
    ("kpm-4d", lambda c: {"key_padding_mask": torch.ones(B, 1, 1, SK, dtype=torch.bool)},
     InErr, "key_padding_mask", "(B, Sk)"),
    ("kpm-float-dtype", lambda c: {"key_padding_mask": torch.ones(B, SK)}, TypeErr,
     "key_padding_mask", "float32"),
    ("kpm-not-tensor", lambda c: {"key_padding_mask": [[True] * SK] * B}, TypeErr,
     "key_padding_mask", "list"),
    ("kpm-wrong-device", lambda c: {"key_padding_mask": meta(B, SK, dtype=torch.bool)}, InErr,
     "key_padding_mask", "meta"),
    ("layout-unknown", lambda c: {"layout": "bsdh"}, InErr, "layout", "'bsdh'"),
    ("layout-none", lambda c: {"layout": None}, InErr, "layout", "None"),
    ("backend-typo", lambda c: {"backend": "sdpa-flsh"}, Unknown, "backend",
     "did you mean 'sdpa-flash'"),
    ("backend-typo-in-list", lambda c: {"backend": ["math", "mth-x"]}, Unknown, "backend",
     "'mth-x'"),
    ("backend-typo-in-string-list", lambda c: {"backend": "math,sdpa_flash"}, Unknown, "backend",
     "did you mean 'sdpa-flash'"),
    ("backend-int", lambda c: {"backend": 3}, TypeErr, "backend", "3"),
    ("backend-list-of-int", lambda c: {"backend": ["math", 3]}, TypeErr, "backend", "3"),
    ("backend-empty", lambda c: {"backend": ""}, TypeErr, "backend", "non-empty"),
    ("backend-trailing-comma", lambda c: {"backend": "math,"}, TypeErr, "backend", "non-empty"),
    ("backend-empty-list", lambda c: {"backend": []}, TypeErr, "backend", "non-empty"),
    ("dropout-negative", lambda c: {"dropout_p": -0.1}, InErr, "dropout_p", "-0.1"),
    ("dropout-one", lambda c: {"dropout_p": 1.0}, InErr, "dropout_p", "[0, 1)"),
    ("dropout-nan", lambda c: {"dropout_p": float("nan")}, InErr, "dropout_p", "nan"),
    ("dropout-str", lambda c: {"dropout_p": "0.1"}, TypeErr, "dropout_p", "str"),
    ("dropout-bool", lambda c: {"dropout_p": True}, TypeErr, "dropout_p", "bool"),
    ("dropout-tensor", lambda c: {"dropout_p": torch.tensor(0.1)}, TypeErr, "dropout_p",
     "Tensor"),
    ("scale-nan", lambda c: {"scale": float("nan")}, InErr, "scale", "nan"),
    ("scale-inf", lambda c: {"scale": float("inf")}, InErr, "scale", "inf"),
    ("scale-str", lambda c: {"scale": "x"}, TypeErr, "scale", "str"),
    ("scale-bool", lambda c: {"scale": True}, TypeErr, "scale", "bool"),
    ("causal-str", lambda c: {"causal": "yes"}, TypeErr, "causal", "str"),
    ("causal-int", lambda c: {"causal": 1}, TypeErr, "causal", "int"),
    ("causal-none", lambda c: {"causal": None}, TypeErr, "causal", "NoneType"),
    ("return-lse-int", lambda c: {"return_lse": 1}, TypeErr, "return_lse", "int"),
    ("return-lse-none", lambda c: {"return_lse": None}, TypeErr, "return_lse", "NoneType"),
]


@pytest.fixture
def no_kernel(spy_backend, monkeypatch):
    """Select the spy and make every other loaded backend's forward fail."""
    def boom(self, *a, **kw):
        raise AssertionError(f"kernel {self.name!r} ran on a bad call")

    for name in ad.list_backends():
        if name == "spy":
            continue
        try:
            inst = ad.get_backend(name)
        except ad.BackendRegistrationError:
            continue
        monkeypatch.setattr(type(inst), "forward", boom)
    with ad.use_backend("spy"):
        yield spy_backend


def test_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-a-cached-call"])
@pytest.mark.parametrize("fn", ["attention", "explain"])
@pytest.mark.parametrize("case_id,change,exc,argument,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(no_kernel, warm, fn, case_id, change, exc, argument, text):
    call = base()
    if warm:  # a valid call of the same shapes first: the cache must not let a bad one in
        ad.attention(**call)
        ad.attention(**call, return_lse=True, causal=True, dropout_p=0.0, scale=0.5)
    before = len(no_kernel.calls)
    call.update(change(call))
    with pytest.raises(exc) as ei:
        getattr(ad, fn)(**call)
    err = ei.value
    assert type(err) is exc, f"{type(err).__name__} raised, {exc.__name__} expected"
    assert err.argument == argument
    assert isinstance(err, ValueError)
    assert isinstance(err, ad.AttentionDispatchError)
    assert isinstance(err, TypeError) == issubclass(exc, ad.AttentionTypeError)
    msg = str(err)
    assert msg.startswith(f"{argument}: expected "), msg
    assert text in msg, msg
    assert err.expected and err.got
    assert len(no_kernel.calls) == before, "a kernel ran before the error"


def test_unknown_backend_lists_known_names():
    with pytest.raises(ad.UnknownBackendError) as ei:
        ad.attention(**base(), backend="flsh")
    err = ei.value
    assert err.name == "flsh"
    assert set(err.known) >= {"math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn"}
    for name in ("'auto'", "'math'", "'sdpa-flash'"):
        assert name in str(err)


def test_no_suggestion_for_far_names():
    with pytest.raises(ad.UnknownBackendError) as ei:
        ad.attention(**base(), backend="zzzzzzzzzzzz")
    assert "did you mean" not in str(ei.value)


def test_error_hierarchy():
    assert issubclass(ad.AttentionInputError, ValueError)
    assert issubclass(ad.AttentionTypeError, TypeError)
    assert issubclass(ad.AttentionTypeError, ad.AttentionInputError)
    assert issubclass(ad.UnknownBackendError, ad.AttentionInputError)
    assert issubclass(ad.BackendUnavailable, RuntimeError)
    assert issubclass(ad.BackendUnavailable, ad.AttentionDispatchError)
    assert issubclass(ad.PluginWarning, UserWarning)


def test_fix_hint_in_message():
    c = base()
    with pytest.raises(ad.AttentionTypeError, match=r"Fix: use key_padding_mask.bool\(\)"):
        ad.attention(**c, key_padding_mask=torch.ones(B, SK))
    with pytest.raises(ad.AttentionTypeError, match="Fix: cast q, k and v to one dtype"):
        ad.attention(c["q"], c["k"].double(), c["v"])


def test_valid_edge_values_are_accepted(no_kernel):
    """The boundaries just inside the allowed ranges work."""
    c = base()
    ad.attention(**c, dropout_p=0, scale=1)  # int values are numbers too
    ad.attention(**c, scale=-0.5)
    ad.attention(**c, mask=torch.zeros(SQ, SK))  # float mask
    ad.attention(**c, mask=torch.ones(1, 1, 1, SK, dtype=torch.bool))
    assert len(no_kernel.calls) == 4
