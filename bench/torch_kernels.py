#!/usr/bin/env python3
"""PyTorch side of bench/kernels: times the references on the same GPU, in the same run.

Prints one JSON object {name: median milliseconds} for the shape given on the command line:
  dense_gemm_{fwd,dx,dw}  cuBLAS bf16 GEMMs of the same FLOPs as the grouped GEMMs
  grouped_mm_{fwd,dx,dw}  torch._grouped_mm (when this PyTorch has it)
  route_eager             the XFT reference gate (softmax, top-k, normalization) + permutation metadata
  merge_fwd, merge_bwd    the mixing-coefficient merge written plainly
  copy_gbps               device-to-device copy bandwidth (for the HBM floors)
  ffn_gateup_fwd          the MoE FFN's gate/up half eagerly: x[order // K], two matmuls, silu * mul
                          (dense cuBLAS GEMMs of the routed rows' FLOPs)
  ffn_fwdbwd              the whole SwiGLU FFN (with down) forward + backward through autograd
  attention_fwd, attention_fwdbwd   causal attention of --attention B,T,H,Hkv,hd (bf16 [B, H, T, hd]):
                          F.scaled_dot_product_attention with the flash backend forced (GQA by
                          enable_gqa, or repeat_interleave inside the timing on an older torch);
                          attention_reference says which ran
With --device cpu only the attention runs (f32, whatever SDPA backend torch picks on the CPU; a
torch without SDPA (before 2.0) runs a plain math reference, labelled so). Any reference that
fails makes the exit status 1 after the JSON line, with the errors on stderr; a reference this
torch lacks by design (torch._grouped_mm) is listed under "missing", not an error.
"""
import argparse
import contextlib
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F


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


def bench_cpu(fn, warmup=1, reps=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def attention_reference(out, shape, dev):
    """times causal attention fwd and fwd+bwd of shape (B, T, H, Hkv, hd) into out"""
    B, T, H, Hkv, hd = shape
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    timer = bench if dev.type == "cuda" else bench_cpu
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, T, hd, device=dev, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, T, hd, device=dev, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, T, hd, device=dev, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, H, T, hd, device=dev, dtype=dtype, generator=g)
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    backend = contextlib.nullcontext
    if sdpa is None:
        mask = torch.ones(T, T, device=dev, dtype=torch.bool).tril()

        def attn(q, k, v):
            kk, vv = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
            s = (q @ kk.transpose(-2, -1)) / hd ** 0.5
            return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ vv

        out["attention_reference"] = f"math reference (torch {torch.__version__} has no scaled_dot_product_attention)"
    else:
        label = "SDPA flash" if dev.type == "cuda" else f"SDPA, torch {torch.__version__}'s CPU backend"
        if dev.type == "cuda":
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
            except ImportError:
                backend = lambda: torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False, enable_mem_efficient=False)  # noqa: E731
        gqa = Hkv != H
        native_gqa = False
        if gqa:
            try:
                with backend(), torch.no_grad():
                    sdpa(q[:, :, :1], k[:, :, :1], v[:, :, :1], is_causal=True, enable_gqa=True)
                native_gqa = True
            except (TypeError, RuntimeError):
                label += ", GQA by repeat_interleave (timed)"

        def attn(q, k, v):
            if gqa and not native_gqa:
                k, v = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
            with backend():
                if native_gqa:
                    return sdpa(q, k, v, is_causal=True, enable_gqa=True)
                return sdpa(q, k, v, is_causal=True)

        out["attention_reference"] = label

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    out["attention_fwd"] = timer(fwd)
    out["attention_fwdbwd"] = timer(lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), do))


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
    p = argparse.ArgumentParser(description="PyTorch references of bench/kernels, timed on the same device; prints one JSON line {name: median ms}.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the attention reference only")
    p.add_argument("--tokens", type=int, help="routed tokens T (GEMM, routing, merge; cuda only)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--attention", type=lambda s: tuple(int(x) for x in s.split(",")), metavar="B,T,H,Hkv,hd",
                   help="causal attention shape (skipped when absent)")
    a = p.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"torch_kernels.py: torch {torch.__version__} sees no CUDA device (use --device cpu for the CPU reference)")
    if a.attention is not None and len(a.attention) != 5:
        p.error("--attention takes B,T,H,Hkv,hd")
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "missing": {}}
    errors = {}

    def run(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the others still run; the exit status says it failed
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"

    if dev.type == "cuda":
        if None in (a.tokens, a.hidden, a.ffn, a.experts, a.topk):
            p.error("--tokens, --hidden, --ffn, --experts, --topk are required on cuda")
        run("gemm_routing_merge", lambda: gemm_routing_merge(out, errors, a, dev))
    if a.attention is not None:
        run("attention", lambda: attention_reference(out, a.attention, dev))
    out["errors"] = errors
    json.dump(out, sys.stdout)
    print()
    if errors:
        sys.exit("torch_kernels.py: PyTorch reference failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


def gemm_routing_merge(out, errors, a, dev):
    T, d, f, E, K = a.tokens, a.hidden, a.ffn, a.experts, a.topk
    M = T * K
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
        except Exception as e:  # noqa: BLE001 - the rest still runs; the exit status says it failed
            traceback.print_exc()
            errors["grouped_mm"] = f"{type(e).__name__}: {str(e)[:300]}"
    else:
        out["missing"]["grouped_mm"] = f"torch {torch.__version__} has no torch._grouped_mm"
    del x, dy, ws

    # the SwiGLU FFN over the routed rows (dense weights: equal FLOPs), eager and through autograd
    xt = torch.randn(T, d, device=dev, dtype=bf, requires_grad=True)
    order = torch.randperm(M, device=dev)
    wg, wu = ((torch.randn(f, d, device=dev, dtype=bf) * 0.02).requires_grad_() for _ in range(2))
    wd = (torch.randn(d, f, device=dev, dtype=bf) * 0.02).requires_grad_()
    dye = torch.randn(M, d, device=dev, dtype=bf)

    def gate_up():
        xp = xt[order // K]
        return F.silu(xp @ wg.t()) * (xp @ wu.t())

    def gate_up_fwd():
        with torch.no_grad():
            gate_up()

    out["ffn_gateup_fwd"] = bench(gate_up_fwd)
    out["ffn_fwdbwd"] = bench(lambda: torch.autograd.grad(gate_up() @ wd.t(), (xt, wg, wu, wd), dye))
    del xt, order, wg, wu, wd, dye

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


if __name__ == "__main__":
    main()
