"""A Llama-style transformers model: attn_implementation="attention_dispatch" vs "sdpa".

Meant for a CUDA GPU (``--device cpu`` with tiny sizes is a smoke test of the
script, which tests/test_bench.py runs).  The model is built from a
config with random weights in bfloat16 (default: 8 layers, hidden 2048, 16
heads, 4 kv heads, intermediate 5632); both sides share the same parameters.

(a) forward+backward, B=1, at --lengths tokens: both sides timed in interleaved
    rounds, a random order each round, CUDA events, median
    (``attention_dispatch.bench.run.time_interleaved``);
(b) a left-padded prefill, B=4 x 4096 tokens with 0/512/1024/2048 padding
    tokens, forward only.

For each case, in the same run: which kernels each side ran (ours: the
dispatcher's decisions, ``ad.events()``; sdpa: the attention kernels' names in
a torch.profiler trace), the attention share of the step (CUDA time of
attention kernels / all CUDA kernel time, torch.profiler), and the max logit
difference between the sides (real positions only).  Writes JSON to --out.

    python bench/hf_llama_bench.py --out hf-llama-h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Callable

import torch

ATTENTION_KERNELS = ("flash", "fmha", "attention", "attn", "sdpa", "cudnn", "mha")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="hf-llama-bench.json", help="JSON results file")
    p.add_argument("--lengths", default="2048,4096,8192,16384", help="fwd+bwd lengths (B=1)")
    p.add_argument("--paddings", default="0,512,1024,2048", help="left padding per row (B=4)")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=15, help="timing rounds per case")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Two models on one set of bf16 parameters: {"ours": ..., "sdpa": ...}."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attention_dispatch.integrations import transformers as adt

    name = adt.register()
    cfg = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
               intermediate_size=args.intermediate, max_position_embeddings=32768)
    torch.manual_seed(0)
    models = {}
    for side, impl in (("ours", name), ("sdpa", "sdpa")):
        with torch.device(args.device):
            m = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation=impl,
                                                 dtype=torch.bfloat16)
        if models:
            m.load_state_dict(models["ours"].state_dict(), assign=True)  # shared weights
        models[side] = m
    return models


def step(model: Any, ids: torch.Tensor, mask: Any, backward: bool) -> Callable[[], Any]:
    def run() -> Any:
        if not backward:
            with torch.no_grad():
                return model(ids, attention_mask=mask).logits
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask).logits
        logits.float().mean().backward()
        return logits
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Attention kernels' names and their share of the kernel time (CUDA
    kernels; on the CPU, the top-level aten ops' self time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as p:
        fn()
        sync(device)
    total, attn, names = 0.0, 0.0, {}
    for e in p.key_averages():
        t = e.device_time_total if cuda else e.self_cpu_time_total
        if t <= 0 or (not cuda and not e.key.startswith("aten::")):
            continue
        total += t
        if any(w in e.key.lower() for w in ATTENTION_KERNELS):
            attn += t
            names[e.key[:120]] = round(t / 1e3, 3)
    return {"attention_ms": round(attn / 1e3, 3), "total_ms": round(total / 1e3, 3),
            "attention_share": round(attn / total, 4) if total else None,
            "attention_kernels": names}


def our_backends(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """The backends our dispatcher chose for the calls of one step."""
    import attention_dispatch as ad

    ad.clear_cache()
    ad.clear_events()
    fn()
    sync(device)
    return sorted({f"{e.backend}: {_describe(e.spec)}" for e in ad.events("decision")})


def _describe(spec: Any) -> str:
    return (f"Sq={spec.seq_q} Sk={spec.seq_k} causal={spec.causal} "
            f"key_padding={spec.key_padding} mask={spec.mask_kind} grad={spec.requires_grad}")


def compare(models: dict[str, Any], ids: torch.Tensor, mask: Any,
            backward: bool, rounds: int) -> dict[str, Any]:
    from attention_dispatch.bench.run import time_interleaved

    device = ids.device
    fns = {side: step(m, ids, mask, backward) for side, m in models.items()}
    with torch.no_grad():
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        a, b = (models[s](ids, attention_mask=mask).logits[real].float() for s in ("ours", "sdpa"))
        diff = (a - b).abs().max().item()
    kernels = our_backends(fns["ours"], device)
    ms = time_interleaved(fns, device, rounds=rounds)
    return {"ms": ms, "speedup_vs_sdpa": ms["sdpa"] / ms["ours"], "max_logit_diff": diff,
            "ours_backends": kernels,
            "profile": {side: profile(fn, device) for side, fn in fns.items()}}


def train_cases(models: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, args.vocab, (1, n), device=args.device)
        out[str(n)] = compare(models, ids, None, backward=True, rounds=args.rounds)
        print(f"fwd+bwd S={n}: ours/sdpa speedup {out[str(n)]['speedup_vs_sdpa']:.3f}",
              flush=True)
    return out


def prefill_case(models: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    pads = [int(x) for x in args.paddings.split(",")]
    n = args.prefill_len
    ids = torch.randint(1, args.vocab, (len(pads), n), device=args.device)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):  # left padding, as generate() has it
        mask[row, :p] = 0
    res = compare(models, ids.masked_fill(mask == 0, 0), mask, backward=False,
                  rounds=args.rounds)
    prof = res["profile"]
    res["attention_speedup_vs_sdpa"] = (prof["sdpa"]["attention_ms"]
                                        / max(prof["ours"]["attention_ms"], 1e-9))
    print(f"left-padded prefill B={len(pads)} S={n}: step {res['speedup_vs_sdpa']:.3f}, "
          f"attention {res['attention_speedup_vs_sdpa']:.3f}", flush=True)
    return res


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    import transformers

    import attention_dispatch as ad

    models = build(args)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    result = {"host": platform.node(), "gpu": gpu,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "attention_dispatch": ad.__version__, "args": vars(args),
              "fwd_bwd_b1": train_cases(models, args),
              "left_padded_prefill": prefill_case(models, args)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
