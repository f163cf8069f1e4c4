"""CPU training-step time of a tiny Transformer with mHC residuals against the same model with plain residuals.

    PYTHONPATH=. python -m profiling.cpu_layer_bench [--tokens 1024] [--hidden 64] [--streams 4] [--reps 20]

Model: 2 blocks of (pre-norm causal self-attention, pre-norm GELU FFN), C=64, 4 heads, vocabulary 256, batch 8 x
sequence 128 = 1024 tokens; a training step is forward, cross-entropy, backward and an AdamW step. Variants: plain
residual; mHC (n=4) on the fast CPU kernels (mhc._cpu, what `import mhc` registers); mHC on the reference kernels
(the ops' default, mhc.reference) for comparison. Also one pre_mapping site fwd+bwd alone. Reports the fastest of
``--reps`` steps after warm-up (robust on a shared machine). Goal of issue 9: mHC at most 3x the plain step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import mhc
from mhc import ops, reference


class Attention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.norm, self.qkv, self.out, self.heads = nn.RMSNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c), heads

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # [B, S, C] in
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


class FFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = nn.Sequential(nn.RMSNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):
        return self.net(x)


class Plain(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class Model(nn.Module):
    def __init__(self, c, n, vocab=256, blocks=2, heads=4):
        super().__init__()
        self.n = n
        self.embed, self.norm, self.lm_head = nn.Embedding(vocab, c), nn.RMSNorm(c), nn.Linear(c, vocab)
        sites = []
        for i in range(blocks):
            for j, f in enumerate((Attention(c, heads), FFN(c))):
                kind = ("attn", "ffn")[j]
                sites.append(Plain(f) if n == 0 else mhc.MHC(f, c, n, kind=kind, layer_index=2 * i + j))
        self.sites = nn.ModuleList(sites)

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.n:
            h = mhc.expand(h, self.n)
        for site in self.sites:
            h = site(h)
        if self.n:
            h = mhc.collapse(h, self.n, "sum")
        return self.lm_head(self.norm(h))


def _median_ms(fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3  # the least disturbed run: this machine may be shared


def _step_fn(model, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class _ReferenceKernels:
    """Temporarily serve the CPU ops with the reference (the ops' default kernels), for comparison."""

    def __enter__(self):
        self._saved = []
        for op, fwd in (
            (ops.sinkhorn_fwd, lambda L, i, e: reference.sinkhorn(L, i, e)),
            (ops.sinkhorn_bwd, lambda g, L, i, e: reference.sinkhorn_backward(g, L, i, e)),
            (ops.pre_mapping_fwd, reference.pre_mapping),
            (ops.pre_mapping_bwd, reference.pre_mapping_backward),
        ):
            self._saved.append(op)
            op.register_kernel("cpu")(fwd)
        return self

    def __exit__(self, *exc):
        from mhc import _cpu

        ops.sinkhorn_fwd.register_kernel("cpu")(_cpu.sinkhorn_fwd)
        ops.sinkhorn_bwd.register_kernel("cpu")(_cpu.sinkhorn_bwd)
        ops.pre_mapping_fwd.register_kernel("cpu")(_cpu.pre_mapping_fwd)
        ops.pre_mapping_bwd.register_kernel("cpu")(_cpu.pre_mapping_bwd)


def _site_ms(T, n, C, reps):
    m = reference.num_coefficients(n)
    x = torch.randn(T, n, C, requires_grad=True)
    phi = (torch.randn(n * C, m) * 0.02).requires_grad_(True)
    alpha = torch.full((3,), 0.01, requires_grad=True)
    bias = torch.randn(m).requires_grad_(True)

    def site():
        li, h_post, h_res = mhc.pre_mapping(x, phi, alpha, bias)
        (li.sum() + h_post.sum() + h_res.square().sum()).backward()

    return _median_ms(site, reps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    seq = args.tokens // args.batch
    tokens = torch.randint(0, 256, (args.batch, seq + 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.batch}x{seq} tokens, C={args.hidden}")
    plain = _median_ms(_step_fn(Model(args.hidden, 0), tokens), args.reps)
    fast = _median_ms(_step_fn(Model(args.hidden, args.streams), tokens), args.reps)
    site_fast = _site_ms(args.tokens, args.streams, args.hidden, args.reps)
    with _ReferenceKernels():
        slow = _median_ms(_step_fn(Model(args.hidden, args.streams), tokens), args.reps)
        site_slow = _site_ms(args.tokens, args.streams, args.hidden, args.reps)
    print(f"training step, plain residual         : {plain:8.2f} ms")
    print(f"training step, mHC n={args.streams} (CPU kernels)  : {fast:8.2f} ms  ({fast / plain:.2f}x plain)")
    print(f"training step, mHC n={args.streams} (reference)    : {slow:8.2f} ms  ({slow / plain:.2f}x plain)")
    print(f"one pre_mapping site fwd+bwd, CPU kernels: {site_fast:6.2f} ms; reference: {site_slow:6.2f} ms")
    return {"plain": plain, "mhc": fast, "mhc_reference": slow, "site": site_fast, "site_reference": site_slow}


if __name__ == "__main__":
    main()
