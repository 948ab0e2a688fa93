#!/usr/bin/env python3
"""PyTorch side of bench/train: the same three models written plainly in PyTorch eager, timed on
the same GPU in the same run.

  dense  a Llama: embedding, RMSNorm, causal attention with RoPE (F.scaled_dot_product_attention),
         SwiGLU FFN, untied head; cross-entropy
  moe    its upcycle as the XFT reference computes it: mlp router Linear -> tanh -> Linear with
         noise N(0,1) * (softplus(x W_noise) + 0.01), softmax, top-(K-1) normal experts, normalized
         weights (shared expert 1 - p1, the others p1 * softmax of the selected probabilities), a
         Python loop over the experts (index_select / index_add_), balance loss 0.01 (cv² of
         importance and load)
  merge  the merged FFN W = Σ c_e W_e recomputed each step from frozen expert stacks (einsum), only
         the mixing coefficients α trained

Precision: --dtype bf16 runs under torch.autocast(bfloat16) with f32 parameters (AMP), f32 runs
plain f32. Optimizer torch.optim.AdamW. Prints one JSON object
{dense|moe|merge: {ms, peak_bytes, loss}} with the median step time after two warm-up steps and
torch.cuda.max_memory_allocated over the run. If any model fails (out of memory included), the
error goes to stderr and the exit status is 1 (bench/train then stops: no silent "-" columns).
"""
import argparse
import json
import math
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, d, heads, kv_heads, theta=10000.0):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, self.hd, 2).float() / self.hd)), persistent=False)

    def forward(self, x):
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, T, d))


class DenseFFN(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate = nn.Linear(d, f, bias=False)
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)), None


class MoeFFN(nn.Module):
    """Shared expert 0 + top-(K-1) of E-1 normal experts, as the XFT reference (a loop over experts)."""

    def __init__(self, d, f, E, K):
        super().__init__()
        self.E, self.K = E, K
        self.experts = nn.ModuleList([DenseFFN(d, f) for _ in range(E)])
        self.router0 = nn.Linear(d, E - 1, bias=False)
        self.router2 = nn.Linear(E - 1, E - 1, bias=False)
        self.noise = nn.Linear(d, E - 1, bias=False)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x):
        B, T, d = x.shape
        x = x.reshape(B * T, d)
        clean = self.router2(torch.tanh(self.router0(x)))
        logits = clean + torch.randn_like(clean) * (F.softplus(self.noise(x)) + 0.01)
        p = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = p.topk(self.K - 1, dim=-1)
        p1 = top_p[:, :1]
        w = torch.cat([1 - p1, p1 * torch.softmax(top_p, dim=-1)], dim=-1)  # [N, K]: shared, then normal
        experts = torch.cat([torch.zeros_like(top_i[:, :1]), top_i + 1], dim=-1)
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in range(self.E):
            rows, slot = (experts == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            out, _ = self.experts[e](x.index_select(0, rows))
            y.index_add_(0, rows, out.float() * w[rows, slot].unsqueeze(-1))
        importance = torch.zeros(self.E - 1, device=x.device).scatter_add_(0, top_i.flatten(), top_p.flatten())
        load = torch.bincount(top_i.flatten(), minlength=self.E - 1).float()
        cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)
        return y.to(x.dtype).view(B, T, d), 0.01 * (cv2(importance) + cv2(load))


class MergedFFN(nn.Module):
    """W = λ W_0 + (1 - λ) Σ softmax(α)_i W_i, recomputed each step; only α trains."""

    def __init__(self, d, f, E, rate=0.75):
        super().__init__()
        self.rate = rate
        self.gate = nn.Parameter(torch.randn(E, f, d) * 0.02, requires_grad=False)
        self.up = nn.Parameter(torch.randn(E, f, d) * 0.02, requires_grad=False)
        self.down = nn.Parameter(torch.randn(E, d, f) * 0.02, requires_grad=False)
        self.alpha = nn.Parameter(torch.zeros(E - 1))

    def forward(self, x):
        c = torch.cat([torch.full((1,), self.rate, device=x.device), (1 - self.rate) * torch.softmax(self.alpha, 0)])
        g, u, dn = (torch.einsum("e,eab->ab", c, w) for w in (self.gate, self.up, self.down))
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), dn), None


class Block(nn.Module):
    def __init__(self, d, heads, kv, ffn):
        super().__init__()
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, heads, kv)
        self.ffn = ffn

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        y, aux = self.ffn(self.n2(x))
        return x + y, aux


class Llama(nn.Module):
    def __init__(self, a, kind):
        super().__init__()
        d = a.hidden
        self.embed = nn.Embedding(a.vocab, d)

        def ffn():
            if kind == "dense":
                return DenseFFN(d, a.ffn)
            if kind == "moe":
                return MoeFFN(d, a.ffn, 8, 6)
            return MergedFFN(d, a.ffn, 8)

        self.blocks = nn.ModuleList([Block(d, a.heads, a.kv_heads, ffn()) for _ in range(a.layers)])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, a.vocab, bias=False)
        if kind == "merge":  # only α trains (the reference freezes everything else)
            for n, p in self.named_parameters():
                p.requires_grad = n.endswith("alpha")

    def forward(self, ids, targets):
        x = self.embed(ids)
        aux = 0.0
        for b in self.blocks:
            x, a = b(x)
            if a is not None:
                aux = aux + a
        logits = self.head(self.norm(x))
        # targets is ids[:, 1:], a non-contiguous slice: reshape (view would raise for batch > 1)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux


def measure(a, kind):
    torch.manual_seed(0)
    dev = "cuda"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = Llama(a, kind).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev)
    times, loss = [], 0.0
    for step in range(a.steps + 2):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            l = model(ids[:, :-1], ids[:, 1:])
        l.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = l.item()
        end.record()
        end.synchronize()
        if step >= 2:
            times.append(start.elapsed_time(end))
    times.sort()
    out = {"ms": times[len(times) // 2], "peak_bytes": torch.cuda.max_memory_allocated(), "loss": loss}
    del model, opt
    return out


def main():
    p = argparse.ArgumentParser(description="PyTorch eager reference of bench/train: dense, MoE and merge training steps on one GPU; prints one JSON line.")
    for name, default in [("hidden", 512), ("ffn", 1376), ("layers", 4), ("heads", 8), ("kv-heads", 8), ("vocab", 8192), ("batch", 8), ("seq", 512), ("steps", 10)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"torch_train.py: torch {torch.__version__} sees no CUDA device (this reference runs on the GPU only)")
    result, failed = {}, []
    for kind in ["dense", "moe", "merge"]:
        try:
            result[kind] = measure(a, kind)
        except Exception as e:  # e.g. out of memory: the other models still run, then the exit status is 1
            traceback.print_exc()
            result[kind] = f"{type(e).__name__}: {e}"
            failed.append(kind)
            torch.cuda.empty_cache()
    print(json.dumps(result))
    if failed:
        sys.exit(f"torch_train.py: the PyTorch reference failed for {', '.join(failed)}: " + "; ".join(result[k] for k in failed))


if __name__ == "__main__":
    main()
