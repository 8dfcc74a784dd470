"""The :class:`Decision` object: which backend runs a call and why the others do not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .layout import describe_bytes as _bytes
from .spec import CallSpec

ACCEPTED = "accepted"
CHOSEN = "chosen"
REFUSED = "refused"
SKIPPED = "not tried"


@dataclass(frozen=True)
class BackendVerdict:
    """One backend's answer for one call."""

    name: str
    status: str  # chosen / accepted / refused / not tried
    reasons: tuple[str, ...] = ()
    rank: Optional[int] = None  # position in the candidate order, None if not a candidate
    note: Optional[str] = None  # e.g. an untested package version
    #: estimated extra memory of this path (bytes; None when it refuses the call)
    extra_bytes: Optional[int] = None


@dataclass(frozen=True)
class Decision:
    """Result of :func:`attention_dispatch.explain`.

    Attributes:
        backend: name of the backend that runs the call (None if none can).
        selection: the effective selection, e.g. ("auto",) or ("flash-attn", "auto").
        source: where the selection came from ("argument", "use_backend",
            "ATTENTION_DISPATCH_BACKEND" or "default"), with "+tuned" when a
            stored tuning decision picked the backend.
        spec: the call signature.
        verdicts: one entry per registered backend.
        copies: what is copied before the chosen kernel runs, and why (a
            tensor whose memory layout the kernel cannot read, key-padding
            slots zeroed); empty when the kernel reads the caller's tensors.
        tuned: True when ``backend`` is a stored tuning decision (``attention-
            dispatch tune`` or autotune) for the call's bucket.
        ranked: with ``tuned``, the backend the ranking alone would pick.
        extra_bytes: the chosen path's estimated extra memory in bytes
            (``Backend.buffers`` plus the memory plan's copies when explain()
            had the tensors); None when no backend takes the call.
        buffers: the same, item by item, in words.
    """

    backend: Optional[str]
    selection: tuple[str, ...]
    source: str
    spec: CallSpec
    verdicts: tuple[BackendVerdict, ...] = field(default_factory=tuple)
    tuned: bool = False
    ranked: Optional[str] = None
    copies: tuple[str, ...] = ()
    extra_bytes: Optional[int] = None
    buffers: tuple[str, ...] = ()

    def reasons(self, name: str) -> tuple[str, ...]:
        """Why ``name`` did not run the call (empty if it could)."""
        for v in self.verdicts:
            if v.name == name:
                return v.reasons
        raise KeyError(name)

    def __str__(self) -> str:
        s = self.spec
        head = (f"call: {s.device_type} {str(s.dtype).replace('torch.', '')} "
                f"B={s.batch} Hq={s.heads_q} Hkv={s.heads_kv} Sq={s.seq_q} Sk={s.seq_k} "
                f"D={s.head_dim} Dv={s.head_dim_v} layout={s.layout} mask={s.mask_kind} "
                f"key_padding={s.key_padding} causal={s.causal} dropout={s.dropout} "
                f"lse={s.return_lse} grad={s.requires_grad}")
        if s.window is not None or s.softcap is not None or s.alibi or s.varlen:
            head += f" window={s.window} softcap={s.softcap} alibi={s.alibi} varlen={s.varlen}"
        if s.paged:
            head += f" paged block_size={s.block_size}"
        if s.sinks:
            head += " sinks=True"
        if s.deterministic or s.max_extra_bytes is not None:
            head += f" policy: deterministic={s.deterministic} max_extra_bytes={s.max_extra_bytes}"
        chosen = f"chosen: {self.backend or 'none'}"
        if self.tuned:
            chosen += (" (tuned: the stored tuning decision for this shape bucket; "
                       f"the ranking alone picks {self.ranked})")
        lines = [head, f"selection: {','.join(self.selection)} (from {self.source})", chosen]
        lines += [f"  {c}" for c in self.copies]
        if self.extra_bytes is not None:
            lines.append(f"extra memory: ~{_bytes(self.extra_bytes)}"
                         + (" (" + "; ".join(self.buffers) + ")" if self.buffers else ""))
        lines.append("")
        width = max([len(v.name) for v in self.verdicts] + [7])
        lines.append(f"{'rank':>4}  {'backend':<{width}}  {'status':<9}  reasons")
        for v in self.verdicts:
            rank = "-" if v.rank is None else str(v.rank + 1)
            extra = (f"extra ~{_bytes(v.extra_bytes)}",) if v.extra_bytes else ()
            why = "; ".join(v.reasons + extra + ((f"note: {v.note}",) if v.note else ()))
            lines.append(f"{rank:>4}  {v.name:<{width}}  {v.status:<9}  {why}".rstrip())
        return "\n".join(lines)
