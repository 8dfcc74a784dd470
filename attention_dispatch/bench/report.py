"""Bench output: terminal table, CSV, JSON, PNG plot, and the ranking derived from it."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections import defaultdict
from contextlib import contextmanager
from importlib import metadata
from typing import Any, Iterator, Optional

import torch

from .._cli.args import CommandError

Row = dict[str, Any]
COLUMNS = ["case", "backend", "chosen", "ms", "tflops", "first_call_ms", "peak_mb", "correct",
           "auto_over_best", "choice_over_best", "auto_over_torch", "check"]


def environment(device: torch.device) -> dict[str, Any]:
    """Device, versions and date, stored in every result."""
    def ver(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "flash_attn_4": ver("flash-attn-4"),
            "flash_attn": ver("flash-attn"), "xformers": ver("xformers"),
            "attention_dispatch": ver("attention-dispatch"),
            "date": time.strftime("%Y-%m-%d")}


def table(rows: list[Row]) -> str:
    """Rows as an aligned text table (one line per case and backend)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cols = [c for c in COLUMNS if c != "check"]
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def summary(rows: list[Row]) -> str:
    """auto/best over the cases: how many cells reach 0.97."""
    ratios = {r["case"]: r["auto_over_best"] for r in rows if r.get("auto_over_best")}
    if not ratios:
        return "auto/best: no case timed"
    good = sum(1 for v in ratios.values() if v >= 0.97)
    picks = {r["case"]: r["choice_over_best"] for r in rows if r.get("choice_over_best")}
    pick_part = (f"; auto's choice within 3 % of the best in "
                 f"{sum(1 for v in picks.values() if v >= 0.97)}/{len(picks)} cases"
                 if picks else "")
    bad = sum(1 for r in rows if r.get("correct") is False)
    vs_torch = {r["case"]: r["auto_over_torch"] for r in rows if r.get("auto_over_torch")}
    torch_part = ""
    if vs_torch:
        faster = sum(1 for v in vs_torch.values() if v >= 1.0)
        torch_part = (f"; auto/torch-default >= 1 in {faster}/{len(vs_torch)} cases "
                      f"(min {min(vs_torch.values()):.3f})")
    return (f"auto/best >= 0.97 in {good}/{len(ratios)} cases (min {min(ratios.values()):.3f})"
            f"{pick_part}{torch_part}; {bad} incorrect rows")


def status(cases_done: int, cases_total: int) -> dict[str, Any]:
    """The grid's state, stored at the top of results.json."""
    return {"complete": cases_done >= cases_total, "cases_done": cases_done,
            "cases_total": cases_total}


@contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A temporary path beside ``path``, moved over it once the block succeeds:
    readers see the old file or the new one, never a partial one."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write(rows: list[Row], out_dir: str, env: dict[str, Any],
          state: Optional[dict[str, Any]] = None, png: bool = True) -> dict[str, str]:
    """results.json, results.csv and (unless ``png`` is false) results.png under
    ``out_dir``, each replaced atomically; ``state`` (see status) goes into the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "csv", "png")}
    with _replacing(paths["json"]) as tmp, open(tmp, "w") as f:
        json.dump({"environment": env, **(state or {}), "rows": rows}, f, indent=1)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with _replacing(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if not png:
        return {k: p for k, p in paths.items() if k != "png"}
    with _replacing(paths["png"]) as tmp:
        plot(rows, tmp, env)
    return paths


def load(out_dir: str) -> Optional[dict[str, Any]]:
    """The results.json that bench wrote under ``out_dir``; None when there is none.

    Raises:
        CommandError: the file is unreadable or not a bench results file.
    """
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CommandError(f"attention-dispatch bench: error: argument --resume: cannot read "
                           f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise CommandError(f"attention-dispatch bench: error: argument --resume: {path} is not a "
                           "results file written by bench")
    return data


def plot(rows: list[Row], path: str, env: dict[str, Any]) -> None:
    """TFLOP/s per backend over sequence length, one panel per (dtype, head dim,
    heads, causal, mode): GQA cases get their own panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("tflops") and r["mask"] == "none" and r["seq_q"] > 1:
            key = (r["dtype"], r["head_dim"], r["heads_q"], r["heads_kv"], r["causal"], r["mode"])
            panels[key][r["backend"]].append((r["seq_k"], r["tflops"]))
    keys = sorted(panels) or [("none", 0, 1, 1, False, "fwd")]
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for backend, pts in sorted(panels.get(key, {}).items()):
            pts.sort()
            style = (dict(lw=2.5, color="black") if backend == "auto" else
                     dict(lw=1.5, color="gray", ls="--") if backend == "torch-default" else {})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend, **style)
        dt, d, hq, hkv, causal, mode = key
        heads = f"H{hq}" if hq == hkv else f"GQA {hq}/{hkv}"
        ax.set_title(f"{dt} d{d} {heads} {'causal' if causal else 'non-causal'} {mode}",
                     fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        if ax.get_legend_handles_labels()[0]:  # an empty panel gets no legend (no warning)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no timed rows", ha="center", va="center",
                    transform=ax.transAxes)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{env['device_name']} torch {env['torch']} {env['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def ranking_from(rows: list[Row]) -> list[str]:
    """A static order from bench rows: backends by their geometric-mean speed
    relative to the best backend of each case they ran (missing cases count as
    not faster than the slowest)."""
    by_case: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["backend"] not in ("auto", "torch-default") and r.get("ms") and r.get("correct"):
            by_case[r["case"]][r["backend"]] = r["ms"]
    score: dict[str, list[float]] = defaultdict(list)
    names = {b for c in by_case.values() for b in c}
    for times in by_case.values():
        best = min(times.values())
        for b in names:
            score[b].append(best / times[b] if b in times else 0.01)
    import math

    gm = {b: math.exp(sum(math.log(x) for x in s) / len(s)) for b, s in score.items()}
    return sorted(gm, key=lambda b: -gm[b])
