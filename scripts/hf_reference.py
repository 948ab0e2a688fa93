#!/usr/bin/env python3
"""Logits of a dense Llama checkpoint folder, computed independently of xft.

    python3 scripts/hf_reference.py CHECKPOINT IDS.json OUT.json [TARGETS.json]

IDS.json: [[token ids of sequence 0], [sequence 1], ...] (equal lengths). OUT.json gets
{"numpy": [[[logits]]], "transformers": [[[logits]]] or null, "transformers_error": str or null}.

`numpy` is a float64 forward written from transformers' LlamaForCausalLM (modeling_llama.py):
RMSNorm weight * x * rsqrt(mean(x^2) + eps); RoPE with rotate_half and linear rope_scaling;
grouped-query attention (query head h reads key/value head h // (H / KV)); SwiGLU MLP; untied
lm_head. It reads safetensors itself (the header, then the raw little-endian data; F32, BF16,
F16), so it needs only numpy. When torch and transformers are importable, the checkpoint is also
loaded with LlamaForCausalLM.from_pretrained and run in float64: that proves the folder loads in
transformers with the names and config it has; a load or run that fails then fails the script.

With TARGETS.json ([[target ids]], -1 = not counted) and torch importable, OUT.json also gets
{"torch": {"loss": mean cross-entropy, "grads": {name: [flat gradient]}}}: the same Llama written
again with torch ops in float64 and differentiated by autograd (the gradients xft's hand-written
backward must reproduce); "torch_error" says why not when torch is missing.
"""
import json
import os
import struct
import sys

import numpy as np


def read_safetensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tensors = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            raw = data[begin:end]
            if meta["dtype"] == "F32":
                a = np.frombuffer(raw, dtype="<f4")
            elif meta["dtype"] == "F16":
                a = np.frombuffer(raw, dtype="<f2")
            elif meta["dtype"] == "BF16":
                a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise SystemExit(f"{key}: dtype {meta['dtype']} not handled")
            tensors[key] = a.astype(np.float64).reshape(meta["shape"])
    return tensors


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def llama_logits(cfg, w, ids):
    ids = np.asarray(ids)
    B, T = ids.shape
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd, eps = d // H, cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if (scaling.get("type") or scaling.get("rope_type")) == "linear" else 1.0
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(T, dtype=np.float64) / factor, inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (n @ w[p + "self_attn.q_proj.weight"].T).reshape(B, T, H, hd)
        k = (n @ w[p + "self_attn.k_proj.weight"].T).reshape(B, T, KV, hd)
        v = (n @ w[p + "self_attn.v_proj.weight"].T).reshape(B, T, KV, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, H // KV, axis=2)  # repeat_kv: head h reads kv head h // (H / KV)
        v = np.repeat(v, H // KV, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(B, T, d)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        n = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = n @ w[p + "mlp.gate_proj.weight"].T
        u = n @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def transformers_available():
    """None when torch and transformers import, else why not (the only failure the caller may excuse)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def transformers_logits(folder, ids):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float64, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def torch_loss_and_grads(cfg, weights, ids, targets):
    """Mean cross-entropy over targets >= 0 and its gradient for every weight, by torch autograd (float64)."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in weights.items()}
    ids_t = torch.tensor(ids)
    B, T = ids_t.shape
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd, eps = d // H, cfg.get("rms_norm_eps", 1e-6)
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if (scaling.get("type") or scaling.get("rope_type")) == "linear" else 1.0
    inv_freq = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64) / factor, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, T, hd]

    def norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rot(x):
        return torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = F.embedding(ids_t, w["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = norm(x, w[p + "input_layernorm.weight"])
        q = F.linear(n, w[p + "self_attn.q_proj.weight"]).view(B, T, H, hd).transpose(1, 2)
        k = F.linear(n, w[p + "self_attn.k_proj.weight"]).view(B, T, KV, hd).transpose(1, 2)
        v = F.linear(n, w[p + "self_attn.v_proj.weight"]).view(B, T, KV, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) / hd ** 0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, d), w[p + "self_attn.o_proj.weight"])
        n = norm(x, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(F.linear(n, w[p + "mlp.gate_proj.weight"])) * F.linear(n, w[p + "mlp.up_proj.weight"])
        x = x + F.linear(mlp, w[p + "mlp.down_proj.weight"])
    logits = F.linear(norm(x, w["model.norm.weight"]), w["lm_head.weight"])
    tgt = torch.tensor(targets).reshape(-1)
    loss = F.cross_entropy(logits.reshape(B * T, -1), torch.where(tgt < 0, torch.full_like(tgt, -100), tgt), ignore_index=-100)
    loss.backward()
    return {"loss": loss.item(), "grads": {k: t.grad.reshape(-1).tolist() for k, t in w.items()}}


def main():
    folder, ids_file, out_file = sys.argv[1:4]
    targets_file = sys.argv[4] if len(sys.argv) > 4 else None
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg.get("architectures") == ["LlamaForCausalLM"] and cfg.get("model_type") == "llama", "not a LlamaForCausalLM config"
    ids = json.load(open(ids_file))
    weights = read_safetensors(folder)
    out = {"numpy": llama_logits(cfg, weights, ids).tolist(), "transformers": None, "transformers_error": None}
    # torch or transformers not installed: reported, the caller decides; installed, a checkpoint that
    # does not load or run is an error (the exception ends the script with a non-zero status)
    out["transformers_error"] = transformers_available()
    if out["transformers_error"] is None:
        out["transformers"] = transformers_logits(folder, ids).tolist()
    if targets_file:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            out["torch"], out["torch_error"] = None, f"{type(e).__name__}: {e}"
        else:
            out["torch"], out["torch_error"] = torch_loss_and_grads(cfg, weights, ids, json.load(open(targets_file))), None
    json.dump(out, open(out_file, "w"))


if __name__ == "__main__":
    main()
