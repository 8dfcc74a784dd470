"""The :class:`Backend` base class every adapter and plugin derives from."""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping, Optional

import torch

from .capabilities import Capabilities, capability_reasons, device_reasons
from .layout import Buffer, StrideRequirements
from .spec import CallSpec

AttentionResult = tuple[torch.Tensor, Optional[torch.Tensor]]


class Backend:
    """An attention kernel behind the one contract.

    Subclasses declare ``capabilities`` as class-level data and implement
    :meth:`forward`.  They may refine :meth:`probe` (is the kernel usable on a
    device at all: package installed, version, hardware) and :meth:`check`
    (per-call limits the capabilities cannot express).  Reasons are strings
    that state the actual and the allowed value.

    ``forward`` always receives q, k, v in the ``bhsd`` view (a transposed view
    of the caller's tensors when the caller used ``bshd``; ``k.is_contiguous()``
    tells nothing about the caller's layout, ``spec.layout`` does; their
    memory already meets :meth:`stride_requirements`, and K/V slots excluded
    by ``key_padding_mask`` hold zeros unless ``capabilities.padded_keys_unread``) and must
    return ``(out, lse)``: out as (B, Hq, Sq, Dv) (any strides), lse as
    (B, Hq, Sq) float32 or None when ``return_lse`` is False.

    Structured attention (docs/structured.md): ``spec.window`` and
    ``spec.softcap`` carry the window and the cap; when ``spec.alibi`` is True
    ``forward`` also receives ``alibi_slopes=`` ((Hq,) or (B, Hq) float32), and
    only then, so a backend without ``capabilities.alibi`` need not accept it.
    A backend declaring ``capabilities.varlen`` implements :meth:`forward_varlen`;
    one naming ``"paged"`` in ``capabilities.extras`` implements :meth:`forward_paged`.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    #: Python distribution whose version is reported (e.g. "flash-attn-4").
    package: ClassVar[Optional[str]] = None
    #: versions of ``package`` this adapter was tested with (a packaging
    #: specifier such as ">=4.0.0b30,<4.1"); outside them it still runs if its
    #: numeric canary passes, and info/explain say so.
    tested_versions: ClassVar[Optional[str]] = None
    #: Where "auto" ranks this backend when no ranking table names it:
    #: {"sm90": "before:sdpa-cudnn", "cpu/short": "first", "*": "last"} (keys: a
    #: device family, "family/shape class" or "*"; values: "first", "last",
    #: "before:NAME", "after:NAME").  Default: just before ``math``.
    ranking: ClassVar[Mapping[str, str]] = {}
    #: ``forward_paged`` loads a row's last cache block whole (block-granular
    #: kernels: flex, FA4) and weighs the slots past the row's length by zero,
    #: so those slots must hold finite values; False: it never reads them.
    #: Blocks a row does not use are never read either way.
    paged_reads_tail: ClassVar[bool] = False
    #: ``forward_paged`` itself gathers the used blocks to a dense batch (math):
    #: its native route is ranked among the gathered routes, not ahead of them.
    paged_gathers: ClassVar[bool] = False
    #: The first call of each new signature compiles a kernel (seconds; e.g.
    #: flex).  A shape-class ranking may then promote this backend only for
    #: calls it has already compiled (:meth:`compiled`); elsewhere it keeps its
    #: place in the device family's table (see ``_core/ranking.py``).
    compiles_per_shape: ClassVar[bool] = False

    def compiled(self, spec: CallSpec) -> bool:
        """Whether a kernel for ``spec`` is ready in this process, so the next
        call compiles nothing.  Always True unless ``compiles_per_shape``; a
        backend that compiles per shape overrides it."""
        return True

    def probe(self, device: torch.device) -> list[str]:
        """Reasons this backend cannot run on ``device`` at all; [] if it can.

        Called once per (backend, device) and cached by the registry.
        """
        return device_reasons(self.capabilities, device)

    def capabilities_on(self, device: torch.device) -> Capabilities:
        """What the backend supports on ``device`` (for ``info``): the declared
        ``capabilities``, narrowed by a backend whose :meth:`check` refuses some
        of them on some devices (e.g. flex: no LSE, no gradients on the CPU)."""
        return self.capabilities

    def check(self, spec: CallSpec) -> list[str]:
        """Per-call reasons beyond the declared capabilities (override if needed)."""
        return []

    def stride_requirements(self, spec: CallSpec) -> StrideRequirements:
        """What the kernel needs of its inputs' memory for the call ``spec``
        (default: ``capabilities.strides``; override where it depends on the
        device).  The dispatcher copies the tensors that break it."""
        return self.capabilities.strides

    def supports(self, spec: CallSpec) -> list[str]:
        """Every reason this backend refuses the call ``spec``; [] if it accepts."""
        return capability_reasons(self.capabilities, spec) + self.check(spec)

    def determinism(self, spec: CallSpec) -> tuple[bool, bool]:
        """(forward, backward) deterministic for the call ``spec``: bitwise
        identical results for identical inputs on one device.  Default: the
        ``deterministic_forward``/``deterministic_backward`` capabilities on
        ``spec``'s device (:meth:`capabilities_on`)."""
        caps = self.capabilities_on(spec.device)
        return caps.deterministic_forward, caps.deterministic_backward

    def nondeterminism_note(self, spec: CallSpec, backward: bool) -> str:
        """Why the forward (``backward``: the backward) is not deterministic, in
        parentheses, for the refusal under ``deterministic=True`` (override to
        name the cause, e.g. atomics)."""
        return "(not declared deterministic)"

    def buffers(self, spec: CallSpec) -> tuple[Buffer, ...]:
        """The extra memory this backend allocates for ``spec`` beyond q, k, v
        and the output: score matrices, materialised masks or biases, K/V copies
        (an estimate; the dispatcher adds the copies of its memory plan).
        Read by ``max_extra_bytes``, explain() and the large-buffer warning.
        Default: nothing (a plugin that materialises something says so here)."""
        return ()

    def extra_bytes(self, spec: CallSpec) -> int:
        """The sum of :meth:`buffers` (bytes)."""
        return sum(b.nbytes for b in self.buffers(spec))

    def version(self) -> Optional[str]:
        """Version of the underlying package, or None."""
        if self.package is None:
            return None
        from importlib import metadata

        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return None

    def describe(self) -> str:
        """A short description for info tables (kernel name, version)."""
        v = self.version()
        return f"{self.package} {v}" if v else (self.package or "torch")

    def version_note(self) -> Optional[str]:
        """A note when the installed ``package`` is outside ``tested_versions``."""
        v = self.version()
        if v is None or self.tested_versions is None:
            return None
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            ok = Version(v) in SpecifierSet(self.tested_versions, prereleases=True)
        except InvalidVersion:
            ok = False
        if ok:
            return None
        return (f"{self.package} {v} is outside the tested versions {self.tested_versions}; "
                "used while its numeric check passes")

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        spec: CallSpec,
        mask: Optional[torch.Tensor],
        key_padding_mask: Optional[torch.Tensor],
        dropout_p: float,
        scale: float,
    ) -> AttentionResult:
        """Run the kernel.  See the class docstring for shapes."""
        raise NotImplementedError

    def plain_call(self, spec: CallSpec, scale: float, dropout_p: float, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor
                   ) -> Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                          torch.Tensor]]:
        """Optional: ``out = f(q, k, v)`` for calls of ``spec`` without mask,
        key padding, lse or tensor options (bhsd views, the strides of q, k, v
        here), the same result as :meth:`forward` with ``scale`` and
        ``dropout_p``, for less host time; None (the default): the hot path
        calls :meth:`forward`.  Decided once per call signature."""
        return None

    def forward_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        spec: CallSpec,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        dropout_p: float,
        scale: float,
        alibi_slopes: Optional[torch.Tensor] = None,
    ) -> AttentionResult:
        """Packed variable-length attention (only if ``capabilities.varlen``).

        Shapes (the flash-attn convention): q (Tq, Hq, D), k (Tk, Hkv, D),
        v (Tk, Hkv, Dv); cu_seqlens_q/k (B + 1,) int32, sequence b is
        ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``.  Returns out (Tq, Hq, Dv)
        and lse (Hq, Tq) float32 (None unless ``spec.return_lse``).  Causal,
        window and ALiBi are bottom-right per sequence.  ``spec.batch`` is B,
        ``spec.seq_q``/``spec.seq_k`` are max_seqlen_q/max_seqlen_k.
        """
        raise NotImplementedError(f"backend {self.name!r} declares no varlen support")

    def forward_paged(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        spec: CallSpec,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        scale: float,
    ) -> AttentionResult:
        """Attention over a paged KV cache (only if ``"paged"`` is in
        ``capabilities.extras``; see :func:`attention_dispatch.attention_paged`).

        Shapes: q (B, Sq, Hq, D); k_cache (num_blocks, block_size, Hkv, D),
        v_cache (num_blocks, block_size, Hkv, Dv); block_table (B, max_blocks)
        int32, contiguous; cache_seqlens (B,) int32 (validated: Sq <=
        cache_seqlens[b] <= max_blocks * block_size, used blocks in range and
        distinct within a row).  q and the caches already meet
        :meth:`stride_requirements` (copied when they did not).
        Row b's key j (j < cache_seqlens[b]) is slot ``j % block_size`` of
        block ``block_table[b, j // block_size]``; no other slot or block may
        influence the result.  Causal and window are bottom-right per row
        (query i sits at position i + cache_seqlens[b] - Sq).  Returns out
        (B, Sq, Hq, Dv) and lse (B, Hq, Sq) float32 (None unless
        ``spec.return_lse``).  Later tensor options (e.g. sinks) arrive as
        keywords of their own name, only when given.
        """
        raise NotImplementedError(f"backend {self.name!r} declares no paged support")
