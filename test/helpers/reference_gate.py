#!/usr/bin/env python3
"""An MoE checkpoint folder as the XFT reference reads it, computed independently of xft (numpy only).

    python3 test/helpers/reference_gate.py CHECKPOINT X.json OUT.json

Written from github.com/ise-uiuc/xft, src/magicoder/model/: configuration_llama_moe_upscaling.py
(LlamaMoEUpscalingConfig: its defaults, which fill every key config.json lacks, and
_rope_scaling_validation) and modeling_llama_moe_upscaling_hf.py (BaseMoELayer._create_gate picks
the gate class by config.gate_type; the classes' __init__ give the parameters a layer has, their
forward in eval mode (no noise) the routing). X.json: [[x_0], ...], the FFN inputs [T, d] of every
layer. OUT.json gets:
  config_error      what LlamaMoEUpscalingConfig would raise (rope_scaling validation), or null
  defaulted         the keys the config class fills with its own (DeepSeek-Coder) defaults
  gate_class        the gate class the reference builds, or null with gate_error
  tensor_errors     gate parameters the module has that the checkpoint lacks, or has in another
                    shape, and gate tensors the checkpoint has that the module does not use
  layers            per layer: "weights" [T][E] (each expert's routing weight, 0 where not
                    selected) and "importance" [N] (the gate's importance output)
"""
import json
import os
import sys

import numpy as np

# the safetensors reader of the float64 reference forward (every tensor of a folder, single file or shards, as float64)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from hf_reference import read_safetensors  # noqa: E402


# LlamaMoEUpscalingConfig.__init__ defaults (the keys that matter to a loaded model)
CONFIG_DEFAULTS = {
    "vocab_size": 32256, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-6, "pad_token_id": 32014, "bos_token_id": 32013, "eos_token_id": 32014,
    "rope_theta": 10000.0, "rope_scaling": {"factor": 4.0, "type": "linear"},
    "num_experts": 8, "num_selects": 2, "gate_type": "TopKBalancedNoisyGate", "gate_network": "mlp",
    "gate_use_softmax": True, "gate_use_balance": True, "gate_balance_loss_weight": 1e-2,
    "gate_add_noise": True, "gate_noise_epsilon": 1e-2, "calculator_type": "UniversalCalculator",
    "multiply_gate_scores": True, "score_scale_factor": 1.0,
}

# gate class -> (routes over E - 1 columns with a shared expert 0, normalizes the weights)
GATES = {
    "TopKUniversalBalancedNoisyGate": (True, True),
    "TopKUniversalBalancedNoNormalizationNoisyGate": (True, False),
    "TopKBalancedNoisyGate": (False, None),
}


def rope_scaling_error(rs):
    """LlamaMoEUpscalingConfig._rope_scaling_validation, as a message (None: valid)."""
    if rs is None:
        return None
    if not isinstance(rs, dict) or len(rs) != 2:
        return f"rope_scaling must be a dictionary with two fields, got {rs}"
    if rs.get("type") not in ("linear", "dynamic"):
        return f"rope_scaling's type must be one of ['linear', 'dynamic'], got {rs.get('type')}"
    f = rs.get("factor")
    if f is None or not isinstance(f, float) or f <= 1.0:
        return f"rope_scaling's factor must be a float > 1, got {f!r}"
    return None


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def gate_forward(cls, w, prefix, network, x, E, K):
    """The gate's forward in eval mode: (topK_indices [T, K], topK_scores [T, K], importance [N])."""
    if network == "mlp":
        logits = np.tanh(x @ w[prefix + "gate_network.0.weight"].T) @ w[prefix + "gate_network.2.weight"].T
    else:
        logits = x @ w[prefix + "gate_network.weight"].T
    T, N = logits.shape
    # topk: descending; stable argsort of -logits breaks ties toward the lower index, as xft
    order = np.argsort(-logits, axis=1, kind="stable")
    universal, normalize = GATES[cls]
    S = K - 1 if universal else K
    idx = order[:, :S]
    if universal:
        all_logits = np.take_along_axis(logits, order, axis=1)
        p = softmax(all_logits)[:, :S]  # top_k_1_scores: the largest S of softmax over all N
        scores = p
        if normalize:
            g = softmax(p) * p[:, :1]
        else:
            g = p
        top_idx = np.concatenate([idx + 1, np.zeros((T, 1), dtype=idx.dtype)], axis=1)
        top_scores = np.concatenate([g, 1.0 - p[:, :1]], axis=1)
    else:
        scores = softmax(np.take_along_axis(logits, idx, axis=1))
        top_idx, top_scores = idx, scores
    importance = np.zeros(N)
    for t in range(T):
        importance[idx[t]] += scores[t]  # scores_filtered.sum(0)
    return top_idx, top_scores, importance


def main():
    folder, x_file, out_file = sys.argv[1:4]
    cfg = json.load(open(f"{folder}/config.json"))
    out = {"defaulted": sorted(k for k in CONFIG_DEFAULTS if k not in cfg), "tensor_errors": [], "layers": []}
    full = {**CONFIG_DEFAULTS, **cfg}
    out["config_error"] = rope_scaling_error(full["rope_scaling"])
    cls = full["gate_type"]
    if cls not in GATES:
        out["gate_class"], out["gate_error"] = None, f"BaseMoELayer._create_gate: NotImplementedError for {cls}"
        json.dump(out, open(out_file, "w"))
        return
    out["gate_class"] = cls
    w = read_safetensors(folder)
    x_all = np.asarray(json.load(open(x_file)), dtype=np.float64)
    E, K, d = full["num_experts"], full["num_selects"], full["hidden_size"]
    N = E - 1 if GATES[cls][0] else E
    network = full["gate_network"].lower()
    for i in range(full["num_hidden_layers"]):
        prefix = f"model.layers.{i}.mlp.gate."
        want = {"gate_network.0.weight": [N, d], "gate_network.2.weight": [N, N]} if network == "mlp" else {"gate_network.weight": [N, d]}
        if full["gate_add_noise"]:
            want["weight_noise.weight"] = [N, d]
        for name, shape in want.items():
            if prefix + name not in w:
                out["tensor_errors"].append(f"missing {prefix + name}")
            elif list(w[prefix + name].shape) != shape:
                out["tensor_errors"].append(f"{prefix + name}: shape {list(w[prefix + name].shape)}, module {shape}")
        for key in w:
            if key.startswith(prefix) and key[len(prefix):] not in want:
                out["tensor_errors"].append(f"unused {key}")
        if out["tensor_errors"]:
            continue
        idx, scores, importance = gate_forward(cls, w, prefix, network, x_all[i], E, K)
        weights = np.zeros((idx.shape[0], E))
        for t in range(idx.shape[0]):
            weights[t, idx[t]] += scores[t]
        out["layers"].append({"weights": weights.tolist(), "importance": importance.tolist()})
    json.dump(out, open(out_file, "w"))


if __name__ == "__main__":
    main()
