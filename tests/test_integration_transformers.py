"""transformers: ``attn_implementation="attention_dispatch"`` on tiny random
models (Llama with GQA, Mistral with a sliding window, Qwen2 with mixed
sliding/full layers, Gemma 2 with softcapping) against ``"eager"``: logits,
gradients, greedy generation with dynamic and static caches (also compiled)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import attention_dispatch as ad

transformers = pytest.importorskip("transformers")
adt = pytest.importorskip("attention_dispatch.integrations.transformers")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
KINDS = ["llama", "mistral", "qwen2", "gemma2"]


def config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON)
    if kind == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=5)
    if kind == "qwen2":
        return transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5,
                                        max_window_layers=1,
                                        layer_types=["sliding_attention", "full_attention"])
    return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=5,
                                     attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                     query_pre_attn_scalar=16)


@functools.lru_cache(maxsize=None)
def _models(kind: str):
    name = adt.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config(kind)),
                                                          attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config(kind)),
                                                         attn_implementation=name)
    ours.load_state_dict(eager.state_dict())
    return eager.eval(), ours.eval()


@pytest.fixture
def models(request):
    eager, ours = _models(request.param)
    yield eager, ours
    eager.eval(), ours.eval()
    eager.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)


def batch(padded: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padded:  # left padding, as generate() wants it
        mask[1, :3] = 0
        mask[2, :7] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def test_register_returns_the_name_and_sets_both_interfaces():
    assert adt.register("attention_dispatch") == "attention_dispatch"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["attention_dispatch"] is adt.attention_forward
    assert AttentionMaskInterface._global_mapping["attention_dispatch"] is adt.mask_interface
    with pytest.raises(ad.AttentionTypeError):
        adt.register("")


@pytest.mark.parametrize("models", KINDS, indirect=True)
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_eager(models, padded):
    eager, ours = models
    ids, mask = batch(padded)
    with torch.no_grad():
        want = eager(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()  # padding positions attend nothing: 0 here, uniform in eager
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("models", KINDS, indirect=True)
def test_gradients_match_eager(models):
    """A loss over the real positions' logits (rows of padding tokens attend
    nothing here; eager gives them a uniform average, which never reaches a
    real position)."""
    eager, ours = models
    ids, mask = batch(padded=True)
    w = torch.randn(128, generator=torch.Generator().manual_seed(2))
    for m in (eager, ours):
        m.train()
        (m(ids, attention_mask=mask).logits[mask.bool()] * w).sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), ours.named_parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("models", KINDS, indirect=True)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_matches_eager(models, cache):
    eager, ours = models
    ids, mask = batch(padded=True)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = eager.generate(ids, attention_mask=mask, **kw)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert got.shape[1] == 22
    assert torch.equal(got, want)


def _compiled_generate(kind: str, backend: str) -> None:
    eager, ours = _models(kind)
    ours = copy.deepcopy(ours)
    ours.generation_config.compile_config = transformers.CompileConfig(
        fullgraph=True, backend=backend, mode=None)
    ours.generation_config.compile_config._compile_all_devices = True  # CPU too
    ids, mask = batch(padded=True)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static")
    want = eager.generate(ids, attention_mask=mask, **kw)
    torch._dynamo.reset()
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), want)
    assert hasattr(ours, "_compiled_call")  # the decode steps ran compiled


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_static_cache_generate_matches_eager(kind):
    """fullgraph=True: no graph break in the attention path.  The "eager"
    compile backend keeps it at a few seconds per model on a 2-core CPU
    (dynamo traces everything); the inductor test compiles one model fully."""
    _compiled_generate(kind, "eager")


def test_compiled_static_cache_generate_with_inductor():
    _compiled_generate("llama", "inductor")


def test_compiled_forward_matches_eager():
    """A compiled forward (fullgraph) of a model with full and sliding layers:
    full layers get key padding; sliding-window masks built while dynamo traces
    are closures it cannot read, so they fall back to transformers' dense mask."""
    eager, ours = _models("gemma2")
    ids, mask = batch(padded=True)
    torch._dynamo.reset()
    f = torch.compile(lambda i, m: ours(i, attention_mask=m, use_cache=False).logits,
                      fullgraph=True, backend="eager")
    ad.clear_events()
    with torch.no_grad():
        got, want = f(ids, mask), eager(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)
    kinds = {(e.spec.mask_kind, e.spec.key_padding) for e in ad.events("decision")}
    assert kinds == {("none", True), ("bool", False)}


def _specs(kind: str, **generate_kw):
    eager, ours = _models(kind)
    ids, mask = batch(padded=True)
    ad.clear_cache()  # every call signature is decided (and recorded) again
    ad.clear_events()
    ours.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                  **generate_kw)
    return [e.spec for e in ad.events("decision")]


def test_registered_function_ran_with_exact_structured_arguments():
    """The decisions recorded while generating: padding as key padding (or, for
    the left-padded prefill, packed real tokens), GQA native, sliding windows as
    window=, softcap as softcap=, never a dense mask."""
    specs = _specs("mistral")
    assert specs and all(s.mask_kind == "none" and s.heads_kv == 2 for s in specs)
    prefill = [s for s in specs if s.seq_q == 12]
    # a left-padded prefill runs packed (varlen) on the real tokens; its padded
    # route on the CPU is a key-padding call
    assert prefill and all((s.key_padding or s.varlen) and s.causal and s.window == (4, 0)
                           for s in prefill)
    assert any(s.varlen for s in prefill)
    specs = _specs("gemma2")
    assert {s.softcap for s in specs} == {5.0} and {s.window for s in specs} == {None, (4, 0)}
    assert all(s.mask_kind == "none" for s in specs)


def test_left_padded_prefill_reads_no_lengths_per_layer(monkeypatch):
    """The packed prefill's cu_seqlens are built from the mask once per forward
    and handed over unchecked: no host read (synchronisation) per layer."""
    from attention_dispatch._core import varlen as core_varlen

    reads: list[int] = []
    check = core_varlen._check_cu_values
    monkeypatch.setattr(core_varlen, "_check_cu_values",
                        lambda *a: reads.append(1) or check(*a))
    specs = _specs("llama")
    assert any(s.varlen for s in specs) and reads == []


def test_static_cache_prefill_reads_only_filled_slots():
    """A static cache hands max_cache_len keys; the prefill reads the first Sq
    (square causal, no mask), decode steps one query over the cache with the
    visible slots as key padding."""
    specs = _specs("llama", cache_implementation="static")
    prefill = [s for s in specs if s.seq_q == 12]
    assert prefill and all(s.seq_k == 12 and s.causal and s.mask_kind == "none"
                           for s in prefill)
    decode = [s for s in specs if s.seq_q == 1]
    assert decode and all(s.key_padding and not s.causal and s.seq_k > 12 for s in decode)


class _Module(torch.nn.Module):
    is_causal = True


def test_mask_none_means_top_left_causal():
    """Without a mask function's result, causal follows transformers' sdpa
    integration: torch's top-left is_causal (Sq < Sk: keys past Sq unseen)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, weights = adt.attention_forward(_Module(), q, k, v, None, scaling=0.5)
    want = ad.sdpa.TORCH_SDPA(q, k, v, is_causal=True, scale=0.5, enable_gqa=True)
    assert weights is None
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-12)


def test_unsupported_arguments_raise_clear_errors():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ad.AttentionInputError, match="output_attentions"):
        adt.attention_forward(_Module(), q, q, q, None, output_attentions=True)
    with pytest.raises(ad.AttentionInputError, match="position_bias"):
        adt.attention_forward(_Module(), q, q, q, None, position_bias=torch.zeros(1, 2, 3, 3))
    with pytest.raises(ad.AttentionInputError, match="attention_mask"):
        adt.attention_forward(_Module(), q, q, q, torch.ones(1, 3, dtype=torch.bool))
    _, ours = _models("llama")
    with pytest.raises(ad.AttentionInputError, match="output_attentions"):
        ours(torch.ones(1, 4, dtype=torch.long), output_attentions=True)


def _gpt_oss():
    """Tiny gpt-oss models (attention sinks, a sliding-window layer), eager and ours,
    with sinks drawn away from their zero init."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = transformers.GptOssConfig(**{**COMMON, "intermediate_size": 64}, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=5,
                                    layer_types=["sliding_attention", "full_attention"])
    name = adt.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                          attn_implementation="eager")
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                         attn_implementation=name)
    ours.load_state_dict(eager.state_dict())
    return eager.eval(), ours.eval()


def test_gpt_oss_sinks_logits_and_gradients_match_eager():
    """gpt-oss passes its sinks as s_aux: logits (left-padded batch) and every
    parameter's gradient, the sinks' included, match eager attention."""
    eager, ours = _gpt_oss()
    ids, mask = batch(padded=True)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real],
                                   eager(ids, attention_mask=mask).logits[real],
                                   rtol=0, atol=1e-4)
    w = torch.randn(128, generator=torch.Generator().manual_seed(2))
    for m in (eager, ours):
        (m(ids, attention_mask=mask).logits[real] * w).sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), ours.named_parameters()):
        if a.grad is None:  # experts no token was routed to
            continue
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-4, msg=name)
    assert ours.model.layers[0].self_attn.sinks.grad.abs().sum() > 0


def test_custom_mask_functions_fall_back_to_transformers_dense_mask():
    mu = pytest.importorskip("transformers.masking_utils")
    fn = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0)
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    kw = dict(batch_size=2, q_length=6, kv_length=6, mask_function=fn, attention_mask=pad)
    got = adt.mask_interface(**kw)
    want = mu.sdpa_mask(allow_is_causal_skip=False, **kw)
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    # the recognised patterns give a DispatchMask (no (Sq, Sk) tensor)
    sliding = mu.sliding_window_causal_mask_function(3)
    m = adt.mask_interface(**{**kw, "mask_function": sliding, "local_size": 3})
    assert isinstance(m, adt.DispatchMask) and m.window == (2, 0) and m.causal
    assert torch.equal(m.key_padding_mask, pad)


def test_hf_llama_bench_script_smoke_on_cpu(tmp_path):
    """bench/hf_llama_bench.py (a GPU benchmark) imports without a GPU, has a
    --help, and runs end to end on the CPU with tiny sizes."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "hf_llama_bench.py"
    spec = importlib.util.spec_from_file_location("hf_llama_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.parse_args(["--help"])
    out = tmp_path / "r.json"
    assert mod.main(["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "4",
                     "--kv-heads", "2", "--intermediate", "64", "--vocab", "64",
                     "--lengths", "32", "--paddings", "0,8", "--prefill-len", "16",
                     "--rounds", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    case = res["fwd_bwd_b1"]["32"]
    assert set(case["ms"]) == {"ours", "sdpa"} and case["ours_backends"]
    assert case["max_logit_diff"] < 0.05  # bfloat16 model
    assert "attention_speedup_vs_sdpa" in res["left_padded_prefill"]


def test_left_padding_is_packed_and_other_padding_is_not():
    from attention_dispatch.integrations.transformers import LeftPacked

    left = torch.tensor([[False, False, True, True], [True, True, True, True],
                         [False, True, True, True]])
    p = LeftPacked.of(left)
    assert p is not None and p.cu_seqlens.tolist() == [0, 2, 6, 9] and p.max_len == 4
    assert p.batch.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert p.pos.tolist() == [2, 3, 0, 1, 2, 3, 1, 2, 3]
    assert LeftPacked.of(left.flip(-1)) is None          # right padding
    assert LeftPacked.of(torch.tensor([[True, False, True, True]])) is None  # a hole
