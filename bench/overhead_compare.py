"""Per-call host cost of two versions of the package, side by side in one run.

Each round starts one short process per source tree (``--before`` and
``--after``, e.g. a ``git worktree`` of an older commit and this checkout), in
alternating order, and each process times, on tiny tensors (B=1, H=2, S=8,
D=16 by default), ``ad.attention(q, k, v)`` (eager, after the first call) and
torch's own ``F.scaled_dot_product_attention`` on the same tensors, as the mean
over ``--repeats`` calls.  The report gives the median over ``--rounds`` of
each, and the ratios after / before and ad / torch for each tree.

Usage::

    git worktree add /tmp/before <commit>
    python bench/overhead_compare.py --before /tmp/before --after . --out cmp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import attention_dispatch as ad
dev, repeats, verify = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
q, k, v = (torch.randn(1, 2, 8, 16, device=dev) for _ in range(3))
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
def mean_us(fn):
    for _ in range(200):
        fn()
    sync(); t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats * 1e6
fns = {"auto": lambda: ad.attention(q, k, v),
       "torch": lambda: F.scaled_dot_product_attention(q, k, v)}
out = {}
for _ in range(3):  # alternate inside the process too; keep the best of 3
    for name, fn in fns.items():
        out[name] = min(out.get(name, 1e9), mean_us(fn))
print(json.dumps(out))
"""


CHECK = r"""
import os
here = os.path.dirname(os.path.dirname(os.path.abspath(ad.__file__)))
if here != os.path.abspath(os.environ["PYTHONPATH"].split(os.pathsep)[0]):
    raise SystemExit(f"imported attention_dispatch from {here}, not the tree under test")
"""


def run_tree(tree: str, device: str, repeats: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    env = {k: v for k, v in env.items() if not k.startswith("ATTENTION_DISPATCH_")}
    # run inside the tree: ``python -c`` puts the working directory first on
    # sys.path, so a child started elsewhere could import another checkout
    proc = subprocess.run([sys.executable, "-c", CHILD + CHECK, device, str(repeats), "0"],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.abspath(tree))
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="source tree of the old version")
    p.add_argument("--after", default=".", help="source tree of the new version")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5000)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for i in range(a.rounds):
        order = ["before", "after"] if i % 2 == 0 else ["after", "before"]
        for side in order:
            res = run_tree(getattr(a, side), a.device, a.repeats)
            for name, us in res.items():
                samples[side].setdefault(name, []).append(us)
    med = {s: {n: round(statistics.median(v), 3) for n, v in d.items()} for s, d in samples.items()}
    report = {"device": a.device, "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "rounds": a.rounds, "repeats": a.repeats,
              "us_per_call": med,
              "after_over_before_auto": round(med["after"]["auto"] / med["before"]["auto"], 3),
              "auto_over_torch_before": round(med["before"]["auto"] / med["before"]["torch"], 3),
              "auto_over_torch_after": round(med["after"]["auto"] / med["after"]["torch"], 3),
              "samples": samples}
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
