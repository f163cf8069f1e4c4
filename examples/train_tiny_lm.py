"""A small decoder-only LM trained with a plain residual, Hyper-Connections (HC) or mHC: the paper's stability
claim (composite Amax gain of ``H_res``: ~3000 for HC at 27B, ~1.6 for mHC) checked at toy scale, on the CPU.

    python examples/train_tiny_lm.py --residual plain,hc,mhc --steps 300 --out docs/stability

The task is synthetic and generated here (no download): sequences from a fixed random order-2 Markov source over a
small vocabulary, with sparse transitions (each context allows ``--branching`` next tokens), so the best achievable
loss is about ``log(branching)`` nats. ``hc`` is the unconstrained dynamic HC of ``docs/spec.md`` §6 (:class:`HyperConnection`);
``mhc`` is :class:`mhc.MHC` in an :class:`mhc.MHCStack` (block recomputation with ``--recompute``). Writes
``metrics.json`` (losses, gradient norms, gains per logged step, final gains per depth) and ``loss.png``,
``composite_gain_depth.png``, ``composite_gain_steps.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mhc  # noqa: E402
from mhc import diagnostics  # noqa: E402

# ---------------------------------------------------------------------------------------------------- data


class MarkovSource:
    """Order-2 Markov chain over ``vocab`` tokens; each context ``(a, b)`` allows ``branching`` next tokens with
    random probabilities. Deterministic in ``seed``."""

    def __init__(self, vocab: int, branching: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.next = torch.stack([torch.randperm(vocab, generator=g)[:branching] for _ in range(vocab * vocab)])
        self.probs = torch.rand(vocab * vocab, branching, generator=g).add_(0.2)
        self.probs /= self.probs.sum(-1, keepdim=True)
        self.entropy = float(-(self.probs * self.probs.log()).sum(-1).mean())  # nats per token, a loss floor

    def sample(self, batch: int, length: int, g: torch.Generator) -> Tensor:
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, :2] = torch.randint(0, self.vocab, (batch, 2), generator=g)
        for t in range(2, length):
            ctx = out[:, t - 2] * self.vocab + out[:, t - 1]
            pick = torch.multinomial(self.probs[ctx], 1, generator=g).squeeze(-1)
            out[:, t] = self.next[ctx, pick]
        return out


# ---------------------------------------------------------------------------------------------------- sublayers


class Attention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.norm, self.qkv, self.out, self.heads = nn.RMSNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c), heads

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


class FFN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.RMSNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------------- HC (baseline)


class HyperConnection(nn.Module):
    """Dynamic Hyper-Connections (``docs/spec.md`` §6, HC Eq. 2 and its dynamic form), unconstrained, for comparison.

    Per token, with the residual ``H [n, C]`` and ``H~ = RMSNorm(H)`` per stream:

        A_m(H) = s_a * tanh(H~ W_m) + A_m      [n]     (read:  layer input = sum_i A_m[i] H_i)
        A_r(H) = s_a * tanh(H~ W_r) + A_r      [n, n]  (row i from stream i)
        B(H)   = s_b * tanh(H~ W_b) + B        [n]     (write: stream j gets B[j] F(layer input))
        x_next[j] = sum_i A_r[i, j] H_i + B[j] F(sum_i A_m[i] H_i)

    so in the paper's orientation ``H_res = A_r^T``, ``H_pre = A_m``, ``H_post = B``. Init: ``W = 0``,
    ``s_a = s_b = 0.01``, ``B = 1``, ``A_m = e_{k mod n}``, ``A_r = I`` (a pre-norm residual at start); every one
    of these is learned. The diagnostics hook sees ``H_res`` like :class:`mhc.MHC`'s.
    """

    _h_res_hook = None

    def __init__(self, sublayer: nn.Module, c: int, n: int, layer_index: int):
        super().__init__()
        self.sublayer, self.n = sublayer, n
        self.norm = nn.RMSNorm(c, elementwise_affine=False)
        self.w_m, self.w_r, self.w_b = (nn.Parameter(torch.zeros(c, k)) for k in (1, n, 1))
        self.s_a, self.s_b = nn.Parameter(torch.tensor(0.01)), nn.Parameter(torch.tensor(0.01))
        self.a_m = nn.Parameter(Fn.one_hot(torch.tensor(layer_index % n), n).float())
        self.a_r = nn.Parameter(torch.eye(n))
        self.b = nn.Parameter(torch.ones(n))

    def forward(self, h: Tensor) -> Tensor:  # [..., n, C]
        hn = self.norm(h)
        a_m = self.s_a * torch.tanh(hn @ self.w_m).squeeze(-1) + self.a_m  # [..., n]
        a_r = self.s_a * torch.tanh(hn @ self.w_r) + self.a_r  # [..., n(i), n(j)]
        b = self.s_b * torch.tanh(hn @ self.w_b).squeeze(-1) + self.b  # [..., n]
        h_res = a_r.transpose(-1, -2)
        if self._h_res_hook is not None:
            self._h_res_hook(self, h_res)
        y = self.sublayer((a_m.unsqueeze(-1) * h).sum(-2))
        return h_res @ h + b.unsqueeze(-1) * y.unsqueeze(-2)


class Plain(nn.Module):
    def __init__(self, sublayer: nn.Module):
        super().__init__()
        self.sublayer = sublayer

    def forward(self, h: Tensor) -> Tensor:
        return h + self.sublayer(h)


# ---------------------------------------------------------------------------------------------------- the model


class TinyLM(nn.Module):
    def __init__(self, residual: str, vocab: int, c: int, blocks: int, heads: int, n: int, recompute):
        super().__init__()
        if residual not in ("plain", "hc", "mhc"):
            raise ValueError(f"TinyLM: expected residual in ('plain', 'hc', 'mhc'), got {residual!r}")
        self.residual, self.n = residual, n
        self.embed = nn.Embedding(vocab, c)
        sites = []
        for i in range(blocks):
            for k, sub in enumerate((Attention(c, heads), FFN(c))):
                idx = 2 * i + k
                if residual == "plain":
                    sites.append(Plain(sub))
                elif residual == "hc":
                    sites.append(HyperConnection(sub, c, n, idx))
                else:
                    sites.append(mhc.MHC(sub, c, n, kind="ffn" if k else "attn", layer_index=idx))
        if residual == "mhc":
            self.sites = mhc.MHCStack(sites, recompute_block=recompute)
        else:
            self.sites = nn.Sequential(*sites)
        self.norm, self.lm_head = nn.RMSNorm(c), nn.Linear(c, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        if self.residual != "plain":
            h = mhc.expand(h, self.n)
        h = self.sites(h)
        if self.residual != "plain":
            h = mhc.collapse(h, self.n, "sum")  # HC's choice: sum the streams, then the final norm
        return self.lm_head(self.norm(h))


def param_groups(model: nn.Module, weight_decay: float):
    """Weight decay on the sublayers' and embedding matrices only (HC's static parts and mHC's phi are excluded)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and ("sublayer" in name or name.startswith("embed")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------- training


def train(residual: str, args, source: MarkovSource) -> dict:
    torch.manual_seed(args.seed)
    recompute = None if not args.recompute else "auto"
    model = TinyLM(residual, args.vocab, args.hidden, args.blocks, args.heads, args.n, recompute)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    g = torch.Generator().manual_seed(args.seed + 1)
    log = {"step": [], "loss": [], "grad_norm": [], "gain_step": [], "composite_forward_last": []}
    log.update({"composite_backward_last": [], "composite_forward_max": [], "composite_backward_max": []})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{residual}] {n_params / 1e6:.2f}M parameters, {2 * args.blocks} residual sites", flush=True)
    t0, final = time.time(), None
    losses, norms = [], []
    for step in range(args.steps):
        tokens = source.sample(args.batch, args.seq + 1, g)
        measure = residual != "plain" and (step % args.log_every == 0 or step == args.steps - 1)
        with diagnostics.collect(model) if measure else _null() as rec:
            logits = model(tokens[:, :-1])
        loss = Fn.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        norms.append(norm.detach())
        if measure:  # the only syncs: once per logged step
            s = rec.summary()
            final = s
            log["gain_step"].append(step)
            log["composite_forward_last"].append(s["composite_forward"][-1])
            log["composite_backward_last"].append(s["composite_backward"][-1])
            log["composite_forward_max"].append(max(s["composite_forward"]))
            log["composite_backward_max"].append(max(s["composite_backward"]))
        if step % args.log_every == 0 or step == args.steps - 1:
            gain = ""
            if measure:
                fwd, bwd = log["composite_forward_max"][-1], log["composite_backward_max"][-1]
                gain = f" composite gain (max over depth) fwd/bwd {fwd:.3g}/{bwd:.3g}"
            print(
                f"[{residual}] step {step:4d} loss {float(loss.detach()):.4f} grad-norm {float(norm):.3g}"
                f"{gain} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    log["step"] = list(range(args.steps))
    log["loss"] = torch.stack(losses).tolist()
    log["grad_norm"] = torch.stack(norms).tolist()
    log["final_diagnostics"] = final
    log["params"] = n_params
    log["seconds"] = time.time() - t0
    log["nan"] = not all(math.isfinite(v) for v in log["loss"])
    return log


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def plot(results: dict, out: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        k = max(1, args.steps // 50)
        loss = torch.tensor(r["loss"])
        smooth = loss.unfold(0, k, 1).mean(-1) if len(loss) >= k else loss
        ax.plot(range(k - 1, k - 1 + len(smooth)), smooth, label=name)
    ax.axhline(results[next(iter(results))]["source_entropy"], color="gray", ls=":", label="source entropy")
    ax.set(xlabel="step", ylabel=f"training loss (mean of {max(1, args.steps // 50)} steps)", title="Tiny LM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        d = r["final_diagnostics"]
        if d is None:
            continue
        depth = range(1, d["layers"] + 1)
        axes[0].plot(depth, d["composite_forward"], marker="o", label=f"{name} composite fwd")
        axes[0].plot(depth, d["composite_backward"], marker="x", ls="--", label=f"{name} composite bwd")
        axes[1].plot(depth, d["single_forward"], marker="o", label=f"{name} single fwd")
        axes[1].plot(depth, d["single_backward"], marker="x", ls="--", label=f"{name} single bwd")
    for ax, title in zip(axes, ("composite H_res gain (end of training)", "single-site H_res gain"), strict=True):
        ax.set(xlabel="site (attention and FFN counted separately)", ylabel="Amax gain (token-averaged)", title=title)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "composite_gain_depth.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if r["gain_step"]:
            ax.plot(r["gain_step"], r["composite_forward_max"], marker=".", label=f"{name} fwd (max over depth)")
            ax.plot(r["gain_step"], r["composite_backward_max"], marker=".", ls="--", label=f"{name} bwd")
    ax.set(xlabel="step", ylabel="composite Amax gain", title="Composite gain during training", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "composite_gain_steps.png"), dpi=120)
    plt.close("all")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--residual", default="plain,hc,mhc", help="comma list of plain, hc, mhc")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--branching", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=8, help="transformer blocks (2 residual sites each)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--n", type=int, default=4, help="residual streams of hc and mhc")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--clip", type=float, default=0.0, help="gradient clipping (0: off, the norm is still logged)")
    p.add_argument("--recompute", action="store_true", help="mhc: block recomputation (Eq. 20 default L_r)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for metrics.json and the plots (none: print only)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    residuals = [r.strip() for r in args.residual.split(",") if r.strip()]
    for r in residuals:
        if r not in ("plain", "hc", "mhc"):
            p.error(f"--residual: expected plain, hc or mhc, got {r!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    source = MarkovSource(args.vocab, args.branching, seed=1234)
    results = {}
    for r in residuals:
        results[r] = train(r, args, source)
        results[r]["source_entropy"] = source.entropy
    summary = {
        "command": "python examples/train_tiny_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": vars(args),
        "source_entropy_nats": source.entropy,
        "results": results,
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if not args.no_plots:
            plot(results, args.out, args)
    return summary


if __name__ == "__main__":
    main()
