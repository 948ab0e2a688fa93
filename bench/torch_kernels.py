#!/usr/bin/env python3
"""PyTorch side of bench/kernels: times the references on the same GPU, in the same run.

Prints one JSON object {name: median milliseconds} for the shape given on the command line:
  dense_gemm_{fwd,dx,dw}  cuBLAS bf16 GEMMs of the same FLOPs as the grouped GEMMs
  grouped_mm_{fwd,dx,dw}  torch._grouped_mm (when this PyTorch has it)
  route_eager             the XFT reference gate (softmax, top-k, normalization) + permutation metadata
  merge_fwd, merge_bwd    the mixing-coefficient merge written plainly
  copy_gbps               device-to-device copy bandwidth (for the HBM floors)
"""
import argparse
import json
import sys

import torch


def bench(fn, warmup=5, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def route_reference(logits, k, with_permutation=True):
    # TopKUniversalBalancedNoisyGate.forward (eval path) + the sort that grouped GEMMs need
    num_selects = k - 1
    n = logits.shape[1]
    scores = torch.softmax(logits.float(), dim=1)
    top_scores, top_idx = scores.topk(num_selects, dim=1)
    importance = torch.zeros_like(scores).scatter(1, top_idx, top_scores).sum(0)
    load = (torch.zeros_like(scores).scatter(1, top_idx, top_scores) > 0).sum(0)
    shared = 1 - top_scores[:, 0]
    normal = torch.softmax(top_scores, dim=1) * top_scores[:, :1]
    experts = torch.cat([top_idx + 1, torch.zeros_like(top_idx[:, :1])], dim=1)
    weights = torch.cat([normal, shared[:, None]], dim=1)
    if with_permutation:
        flat = experts.flatten()
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=n + 1)
        offsets = torch.cumsum(counts, 0)
        return experts, weights, order, offsets, importance, load
    return experts, weights, importance, load


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--ffn", type=int, required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--topk", type=int, required=True)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    T, d, f, E, K = a.tokens, a.hidden, a.ffn, a.experts, a.topk
    M = T * K
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    bf = torch.bfloat16

    # dense cuBLAS GEMMs with the FLOPs of the grouped gate/up projection: [M, d] x [d, f]
    x = torch.randn(M, d, device=dev, dtype=bf)
    w = torch.randn(f, d, device=dev, dtype=bf) * 0.02
    dy = torch.randn(M, f, device=dev, dtype=bf)
    out["dense_gemm_fwd"] = bench(lambda: x @ w.t())
    out["dense_gemm_dx"] = bench(lambda: dy @ w)
    out["dense_gemm_dw"] = bench(lambda: dy.t() @ x)

    # torch._grouped_mm with the routing's group sizes
    logits = torch.randn(T, E - 1, device=dev)
    experts = route_reference(logits, K)[0]
    counts = torch.bincount(experts.flatten(), minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    ws = torch.randn(E, f, d, device=dev, dtype=bf) * 0.02
    if hasattr(torch, "_grouped_mm"):
        try:
            wt = ws.transpose(-2, -1)
            out["grouped_mm_fwd"] = bench(lambda: torch._grouped_mm(x, wt, offs=offs))
            wn = ws  # dx = dy @ w[e]: [M, f] x [f, d]
            out["grouped_mm_dx"] = bench(lambda: torch._grouped_mm(dy, wn, offs=offs))
            out["grouped_mm_dw"] = bench(lambda: torch._grouped_mm(dy.t(), x, offs=offs))
        except Exception as e:  # noqa: BLE001 - report, keep going
            out["grouped_mm_error"] = str(e)[:300]
    del x, dy, ws

    # routing
    out["route_eager"] = bench(lambda: route_reference(logits, K), warmup=10, reps=50)

    # merge: gate, up [E, f, d] and down [E, d, f] in bf16, alpha [E-1], λ = 0.75
    stacks = [torch.randn(E, f, d, device=dev, dtype=bf), torch.randn(E, f, d, device=dev, dtype=bf), torch.randn(E, d, f, device=dev, dtype=bf)]
    alpha = torch.zeros(E - 1, device=dev, requires_grad=True)

    def coeffs():
        return torch.cat([torch.tensor([0.75], device=dev), 0.25 * torch.softmax(alpha, 0)])

    def merge_fwd():
        c = coeffs().to(bf)
        return [torch.einsum("e,e...->...", c, s) for s in stacks]

    grads = [torch.randn(s.shape[1:], device=dev, dtype=bf) for s in stacks]

    def merge_bwd():
        c = coeffs()
        merged = [torch.einsum("e,e...->...", c.to(bf), s) for s in stacks]
        torch.autograd.backward(merged, grads)
        alpha.grad = None

    out["merge_fwd"] = bench(merge_fwd)
    out["merge_bwd"] = bench(merge_bwd)

    # device copy bandwidth (read + write bytes per second) for the floors
    src = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    out["copy_gbps"] = 2 * src.numel() / (ms * 1e-3) / 1e9
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
