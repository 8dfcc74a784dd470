"""The markdown table of a bench grid: auto / torch's default call, auto / best, per case.

Reads the ``results.json`` of ``attention-dispatch bench`` (and, with
``--override``, later results for some cases: their rows replace the grid's
for those cases, marked with a dagger) and prints one row per (dtype, call)
and one column per sequence length; each cell "a/t | a/b (backend)" where a/t
is torch's default call's time over auto's (> 1: auto faster) and a/b the best
backend's time over auto's.  Then the counts of cells at or above 0.98.

    python bench/grid_table.py docs/results/bench-grid-h200-2026-12-03.json \\
        --override docs/results/bench-padding-h200-2026-12-03-cudnn-flag.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

SHORT = {"flash-attn": "FA4", "sdpa-cudnn": "cuDNN", "sdpa-flash": "FA2", "xformers": "xformers",
         "sdpa-mem-efficient": "mem-eff", "triton-decode": "triton"}


def _autos(path: str) -> dict[str, dict[str, Any]]:
    return {r["case"]: r for r in json.load(open(path))["rows"] if r["backend"] == "auto"}


def _call(r: dict[str, Any]) -> tuple[str, str]:
    gqa = f" GQA {r['heads_q']}/{r['heads_kv']}" if r["heads_q"] != r["heads_kv"] else ""
    if r["seq_q"] == 1:
        return r["dtype"], f"decode B={r['batch']}{gqa}, Sk"
    parts = [f"d{r['head_dim']}{gqa}", "causal" if r["causal"] else "",
             "padding" if r["mask"] == "padding" else "", r["mode"]]
    return r["dtype"], " ".join(p for p in parts if p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid")
    ap.add_argument("--override", nargs="*", default=[])
    args = ap.parse_args()
    autos = _autos(args.grid)
    marked = set()
    for path in args.override:
        new = _autos(path)
        marked |= set(new) & set(autos)
        autos.update({c: r for c, r in new.items() if c in autos})
    table: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
    cols: set[int] = set()
    at_ok = ab_ok = n = 0
    for case, r in autos.items():
        at, ab = r.get("auto_over_torch"), r.get("auto_over_best")
        n += 1
        at_ok += at is None or at >= 0.98
        ab_ok += ab is None or ab >= 0.98
        cell = (f"{at:.2f}" if at else "-") + f" \\| {ab:.2f} ({SHORT.get(r['chosen'], r['chosen'])})"
        table[_call(r)][r["seq_k"]] = cell + (" †" if case in marked else "")
        cols.add(r["seq_k"])
    order = sorted(cols)
    print("| dtype | call | " + " | ".join(f"{c // 1024}k" for c in order) + " |")
    print("|---|---|" + "---|" * len(order))
    for (dt, call), cells in table.items():
        print(f"| {dt} | {call} | " + " | ".join(cells.get(c, "") for c in order) + " |")
    print(f"\nauto/torch-default >= 0.98 in {at_ok}/{n} cells; auto/best >= 0.98 in {ab_ok}/{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
