"""What every TileLang program in this package shares: the pinned compile target and the compile call, the constants
the kernel families are built for (stream counts, dtypes, element and vector sizes, sm_90 per-SM limits), and the
fixed-order token-lane reduction of the backward kernels (:class:`TokenLaneSum`).

Target pinning. TileLang refuses to compile when it cannot detect a GPU unless the target is given explicitly, and
its disk cache is keyed on the target. We therefore always pass an explicit target:

* ``MHC_TL_TARGET`` (environment), either a JSON dict such as ``{"kind": "cuda", "arch": "sm_90a"}`` or a bare
  architecture such as ``sm_90a``;
* otherwise the local GPU (``sm_90`` is promoted to ``sm_90a`` and ``sm_100`` to ``sm_100a`` so that Hopper and
  Blackwell-only instructions are available);
* otherwise ``sm_90a`` (H100/H200), so that a machine without a GPU cross-compiles the same binaries the GPU will
  load from the shared cache.

The target is resolved on first use, never at import, so importing ``tl_kernels`` touches neither CUDA nor nvcc.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

DEFAULT_ARCH = "sm_90a"
TARGET_ENV = "MHC_TL_TARGET"

# Pass configs every program is compiled with. Warp specialisation is off: these kernels are bandwidth or latency
# bound and have no producer/consumer pipeline that would benefit, and it keeps the generated code readable.
PASS_CONFIGS: dict[str, Any] = {
    "tl.disable_warp_specialized": True,
}


def _arch_suffix(major: int, minor: int) -> str:
    arch = f"sm_{major}{minor}"
    if major in (9, 10):  # architecture-specific feature sets (wgmma, tcgen05, setmaxnreg, ...)
        arch += "a"
    return arch


@functools.cache
def target() -> dict[str, str]:
    """The TileLang target dict every kernel is compiled for (see the module docstring for the rules)."""
    raw = os.environ.get(TARGET_ENV, "").strip()
    if raw:
        if raw.startswith("{"):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{TARGET_ENV} must be a JSON dict or an arch like 'sm_90a', got {raw!r}") from exc
            if not isinstance(value, dict) or value.get("kind") != "cuda" or "arch" not in value:
                raise ValueError(f"{TARGET_ENV} must name a CUDA target with an arch, got {raw!r}")
            return {str(k): str(v) for k, v in value.items()}
        if not raw.startswith("sm_"):
            raise ValueError(f"{TARGET_ENV} must be a JSON dict or an arch like 'sm_90a', got {raw!r}")
        return {"kind": "cuda", "arch": raw}
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"kind": "cuda", "arch": _arch_suffix(major, minor)}
    except Exception:  # noqa: BLE001 - a broken CUDA install falls back to cross-compilation
        pass
    return {"kind": "cuda", "arch": DEFAULT_ARCH}


def arch() -> str:
    """The ``sm_XX[a]`` architecture of :func:`target`."""
    return target()["arch"]


def compile_program(func, *, pass_configs: dict[str, Any] | None = None):
    """Compile a TileLang ``PrimFunc`` for :func:`target`, through TileLang's disk cache.

    Outputs are never allocated by the kernel (``out_idx=None``): the torch side allocates every tensor, so the
    ops stay allocation-transparent for ``torch.compile`` and CUDA graphs.
    """
    import tilelang

    configs = dict(PASS_CONFIGS)
    if pass_configs:
        configs.update(pass_configs)
    return tilelang.compile(func, out_idx=None, target=target(), pass_configs=configs)


# What every activation kernel family (post_res, pre_proj, pre_finalize, pre_reduce, boundary) is built for. One
# definition each: the families, the registry, the tools and mhc._checks import them.
HIDDEN_MULTIPLE = 64  # every activation kernel needs C to be a multiple of this (128-bit chunks, 64-wide tiles)
MAX_HIDDEN = 65536
ACTIVATION_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")  # TileLang names; coefficients are float32
ACTIVATION_STREAMS: tuple[int, ...] = (1, 2, 4, 6, 8)  # stream counts n
ELEMENT_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
VECTOR_BYTES = 16  # one 128-bit global access per thread and row

# Per-SM limits of compute capability 9.0 (H100, H200; CUDA C++ Programming Guide, "Compute Capabilities"), from
# which launch bounds and resident blocks are computed, and the SM count of an H100 SXM (and H200 SXM).
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
H100_SMS = 132


def validate_activation_config(family: str, n: int, C: int, dtype: str, streams: tuple[int, ...]) -> None:
    """The build-time arguments every activation kernel family takes: ``n`` in ``streams``, ``C`` a positive
    multiple of :data:`HIDDEN_MULTIPLE` up to :data:`MAX_HIDDEN`, ``dtype`` in :data:`ACTIVATION_DTYPES`."""
    if isinstance(n, bool) or not isinstance(n, int) or n not in streams:
        raise ValueError(f"{family}: n must be one of {streams}, got {n!r}")
    if isinstance(C, bool) or not isinstance(C, int) or C <= 0 or C % HIDDEN_MULTIPLE or C > MAX_HIDDEN:
        raise ValueError(f"{family}: C must be a positive multiple of {HIDDEN_MULTIPLE} up to {MAX_HIDDEN}, got {C!r}")
    if not isinstance(dtype, str) or dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{family}: dtype must be one of {ACTIVATION_DTYPES}, got {dtype!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class TokenLaneSum:
    """Fixed-order sum of per-thread partials over the threads of each token, without atomics (the coefficient
    gradients of ``post_res_bwd`` and ``pre_finalize_bwd``).

    Layout: a block of ``threads`` threads serves ``threads // tpt`` tokens with ``tpt`` consecutive threads each
    (``tpt`` a power of two below 32, else a multiple of 32). A warp then holds one token's lanes or whole tokens:
    segments of ``seg = min(tpt, 32)`` lanes, one per (token, warp), ``num_slots = threads // seg`` in the block and
    ``slots_per_token = max(1, tpt // 32)`` per token. The sum, in three steps:

    1. ``butterfly(add_partner, *partials)``: for ``offset`` in ``seg/2, ..., 1`` the kernel's macro
       ``add_partner(offset, *partials)`` adds to every partial its xor partner's (``T.shfl_xor``); offsets below
       ``seg`` never cross a token. Every lane of the warp must take part (full-mask shuffles), so callers run it
       outside their ``t < num_tokens`` guard, lanes past the last token adding zeros.
    2. ``publish(tx, store, *partials)``: lane 0 of each segment runs the kernel's ``store(tx, *partials)``, which
       writes its partials to row ``tx // seg`` of a shared ``[num_slots, K]`` array; then one ``__syncthreads``.
    3. ``slot_sum(total, red, token, (column,))``: ``total = sum_s red[token * slots_per_token + s, column]``, the
       token's rows added in slot order (``total`` a ``T.alloc_var`` or an element of a local buffer).

    The order depends only on (tpt, threads): bitwise reproducible for a given kernel configuration. Only buffers,
    Python values and variables under their own names go into the macros, because TileLang names a variable after
    the macro parameter it is passed to (which would change the generated source); the column travels in a tuple.
    """

    def __init__(self, tpt: int, threads: int):
        self.seg = min(tpt, 32)  # lanes of one token inside one warp
        self.slots_per_token = max(1, tpt // 32)
        self.num_slots = threads // self.seg
        self.offsets = tuple(self.seg >> s for s in range(1, self.seg.bit_length()))  # seg/2, ..., 1

    def macros(self, T):
        """``(butterfly, publish, slot_sum)`` as TileLang macros (built when a program is, so that importing this
        module does not import TileLang)."""
        seg, slots_per_token, offsets = self.seg, self.slots_per_token, self.offsets

        @T.macro
        def butterfly(add_partner, *partials):
            for offset in offsets:  # a Python tuple: expanded at trace time, constant offsets
                add_partner(offset, *partials)

        @T.macro
        def publish(tx, store, *partials):
            if tx % seg == 0:
                store(tx, *partials)
            T.sync_threads()

        @T.macro
        def slot_sum(total: T.Ref, red, token, column):
            total = red[token * slots_per_token, column[0]]
            for s in T.unroll(1, slots_per_token):
                total = total + red[token * slots_per_token + s, column[0]]

        return butterfly, publish, slot_sum
