"""PoC v2 artifacts as upstream's ML node computes them (gonka-ai/vllm `vllm/poc/`:
`gpu_random.py`, `layer_hooks.py`, `poc_model_runner.py`), restated function by function and
per nonce where upstream loops per nonce, on a transformers checkpoint: the reference the
engine's PoC v2 is compared against.

Where upstream relies on vLLM's model code, this follows vLLM's layout rather than
transformers': each decoder layer returns the MLP's output and the residual stream apart
(`(hidden, residual)`, the next layer adding them in float32 in its fused add-RMSNorm), and the
per-round Householder hook reflects both, as `LayerHouseholderHook` does. The attention, MLP
(dense or MoE) and norms' weights are transformers' modules of the checkpoint.

    python poc_v2_reference.py '{"dir": "/tmp/m", "dtype": "float32", "block_hash": "…",
                                 "public_key": "…", "nonces": [0, 1], "seq_len": 16,
                                 "k_dim": 12, "stronger_rng": false}'

Prints JSON `[{"nonce", "vector" (float32 before the float16 encoding), "vector_b64"}]`.
"""

import base64
import hashlib
import json
import math
import sys

import numpy as np
import torch
import transformers

MASK = 0xFFFFFFFF


# --- gpu_random.py -------------------------------------------------------------------------

def seed_from_string(text):
    """The first 8 hex digits of the text's SHA-256."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)


def murmur3_32(keys, seed):
    """Murmur3's 32-bit mix of int32 counters under one seed, in int64 (values below 2^32)."""
    h = torch.full_like(keys, seed & MASK, dtype=torch.int64)
    k = keys.to(torch.int64) & MASK
    k = (k * 0xCC9E2D51) & MASK
    k = ((k << 15) | (k >> 17)) & MASK
    k = (k * 0x1B873593) & MASK
    h = h ^ k
    h = ((h << 13) | (h >> 19)) & MASK
    h = (h * 5 + 0xE6546B64) & MASK
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def uniform(seed, n, device):
    return murmur3_32(torch.arange(n, device=device, dtype=torch.int32), seed).to(torch.float32) / 4294967296.0


def normal(seed, n, device):
    """Box–Muller: the first half of the uniforms are radii, the second angles; cosines, then
    sines."""
    pairs = (n + 1) // 2
    u = uniform(seed, pairs * 2, device)
    u1, u2 = torch.clamp(u[:pairs], min=1e-10), u[pairs:]
    z0 = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    z1 = torch.sqrt(-2.0 * torch.log(u1)) * torch.sin(2.0 * math.pi * u2)
    return torch.cat([z0, z1])[:n]


def generate_inputs(block_hash, public_key, nonces, dim, seq_len, device, dtype):
    result = torch.empty(len(nonces), seq_len, dim, device=device, dtype=dtype)
    for i, nonce in enumerate(nonces):
        seed = seed_from_string(f"{block_hash}_{public_key}_nonce{nonce}")
        result[i] = normal(seed, seq_len * dim, device).view(seq_len, dim).to(dtype)
    return result


def generate_inputs_concat_murmur(block_hash, public_key, nonces, dim, seq_len, device, dtype):
    """The stronger generator: the SHA-256's eight 32-bit words seed eight segments."""
    result = torch.empty(len(nonces), seq_len, dim, device=device, dtype=dtype)
    n = seq_len * dim
    seg = (n + 7) // 8
    for i, nonce in enumerate(nonces):
        digest = hashlib.sha256(f"{block_hash}_{public_key}_nonce{nonce}".encode()).digest()
        words = [int.from_bytes(digest[j:j + 4], "big") for j in range(0, 32, 4)]
        parts = [normal(w, min(seg, n - k * seg), device) for k, w in enumerate(words) if k * seg < n]
        result[i] = torch.cat(parts)[:n].view(seq_len, dim).to(dtype)
    return result


def derive_pseudo_input_ids(block_hash, public_key, nonces, seq_len, vocab, device):
    """DeepSeek-V4's token ids for PoC v2 (its hash-routed layers choose experts by token id,
    and a PoC sequence has none): per nonce, the counters `0..seq_len` hashed under
    `"{block_hash}_{public_key}_nonce{nonce}_input_ids"`, modulo the vocabulary, int32,
    nonce-major."""
    rows = []
    for nonce in nonces:
        seed = seed_from_string(f"{block_hash}_{public_key}_nonce{nonce}_input_ids")
        rows.append(murmur3_32(torch.arange(seq_len, dtype=torch.int32, device=device), seed) % vocab)
    return torch.stack(rows).to(torch.int32).flatten()


def householder_vector(seed_text, dim, device):
    v = normal(seed_from_string(seed_text), dim, device)
    return v / v.norm()


def apply_householder(x, v):
    return x - 2 * (x * v).sum(dim=-1, keepdim=True) * v


def random_pick_indices(block_hash, public_key, nonces, dim, k, device):
    """Per nonce, the k coordinates with the smallest seeded scores, in the order a 1-D
    `topk(sorted=False)` of the negated scores gives them (the order feeds the Haar chain)."""
    out = torch.empty(len(nonces), k, device=device, dtype=torch.int64)
    all_idx = torch.arange(dim, device=device, dtype=torch.int32)
    for i, nonce in enumerate(nonces):
        scores = murmur3_32(all_idx, seed_from_string(f"{block_hash}_{public_key}_nonce_{nonce}_pick_{k}"))
        _, chosen = torch.topk(-scores, k=k, largest=True, sorted=False)
        out[i] = chosen.to(torch.int64)
    return out


def apply_haar_rotation(block_hash, public_key, nonces, x, device):
    """Per nonce, k-1 Householder reflections in a chain."""
    k = x.shape[1]
    y = x.clone()
    for i, nonce in enumerate(nonces):
        for j in range(k - 1):
            v = householder_vector(f"{block_hash}_{public_key}_nonce_{nonce}_haar_hh_{k}_{j}", k, device)
            y[i] = apply_householder(y[i], v.to(y.dtype))
    return y


# --- vLLM's decoder layout and norms (vllm/ir/ops/layernorm.py, models/qwen3.py) -----------

def rms_norm(x, norm):
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon)
    return (x.to(norm.weight.dtype) * norm.weight).to(dtype)


def fused_add_rms_norm(x, residual, norm):
    """The sum in float32, kept as the new residual in the model's dtype; the norm of the
    float32 sum."""
    dtype = x.dtype
    x = x.to(torch.float32) + residual.to(torch.float32)
    residual = x.to(dtype)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon)
    return (x.to(norm.weight.dtype) * norm.weight).to(dtype), residual


class VllmFormLayer(torch.nn.Module):
    """A transformers decoder layer run as vLLM's Qwen3 layer runs: `(hidden, residual)` in
    and out."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, residual, position_embeddings):
        layer = self.layer
        if residual is None:
            residual = hidden
            hidden = rms_norm(hidden, layer.input_layernorm)
        else:
            hidden, residual = fused_add_rms_norm(hidden, residual, layer.input_layernorm)
        hidden = layer.self_attn(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
        hidden, residual = fused_add_rms_norm(hidden, residual, layer.post_attention_layernorm)
        hidden = layer.mlp(hidden)
        if isinstance(hidden, tuple):  # MoE blocks that also return router logits
            hidden = hidden[0]
        return hidden, residual


def hyper_post(output, residual, post, comb):
    """vLLM's `mhc_post`: the block's output spread over the streams by `post`, plus the
    streams mixed by `comb` (transposed: transformers' `DeepseekV4DecoderLayer` reads it so)."""
    dtype = residual.dtype
    return post.to(dtype).unsqueeze(-1) * output.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), residual)


class V4VllmFormLayer(torch.nn.Module):
    """A transformers DeepSeek-V4 layer run as vLLM's `DeepseekV4DecoderLayer._forward_cuda`
    runs: it returns the feed-forward's output, the streams before that output is spread over
    them, and the feed-forward's `post` and `comb`; the next layer (or the model, after the
    last) spreads and mixes them first. A hook on the layer therefore sees `(output, streams,
    post, comb)`, as upstream's `LayerHouseholderHook` does on vLLM's layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, residual, post, comb, input_ids, attention):
        layer = self.layer
        streams = hidden if residual is None else hyper_post(hidden, residual, post, comb)
        post, comb, collapsed = layer.attn_hc(streams)
        attended, _ = layer.self_attn(layer.input_layernorm(collapsed), **attention)
        streams = hyper_post(attended, streams, post, comb)
        post, comb, collapsed = layer.ffn_hc(streams)
        fed = layer.mlp(layer.post_attention_layernorm(collapsed), input_ids=input_ids)
        return fed, streams, post, comb


# --- layer_hooks.py ------------------------------------------------------------------------

def vllm_layers(model):
    """The model's decoder layers in vLLM's form."""
    if model.config.model_type == "deepseek_v4":
        return torch.nn.ModuleList(V4VllmFormLayer(layer) for layer in model.model.layers)
    assert model.config._attn_implementation == "sdpa", "attention_mask=None must mean causal"
    return torch.nn.ModuleList(VllmFormLayer(layer) for layer in model.model.layers)


def add_reflections(model, block_hash):
    """The per-round hook of every decoder layer: the layer's `(hidden, residual)` each
    reflected by the layer's Householder vector."""
    if model.config.model_type == "glm5_next":
        # `LayerHouseholderHook._find_layers` looks for `model.model.layers`,
        # `model.transformer.h` and `model.layers`; vLLM's `Glm5NextForConditionalGeneration`
        # (0.32) keeps its decoder layers at `language_model.model.layers` and has none of
        # those, so no layer is hooked.
        model.poc_layers = None
        return
    layers = vllm_layers(model)
    device = next(model.parameters()).device
    for i, layer in enumerate(layers):
        v = householder_vector(f"{block_hash}_layer_{i}_householder", model.config.hidden_size, device)

        def hook(module, args, output, v=v):
            # The first two outputs reflected, the rest (DeepSeek-V4's post and comb) passed on.
            hidden, residual, *rest = output
            reflected = apply_householder(hidden, v.to(hidden.dtype)), apply_householder(residual, v.to(residual.dtype))
            return (*reflected, *rest)

        layer.register_forward_hook(hook)
    model.poc_layers = layers


# --- poc_model_runner.py -------------------------------------------------------------------

def forward_v4(model, inputs_embeds, input_ids, layers):
    """vLLM's `DeepseekV4Model.forward`: the embeddings copied into every stream, the layers,
    the last layer's output spread over the streams, the hyper-head's collapse, the norm."""
    inner = model.model
    batch, seq_len, _ = inputs_embeds.shape
    positions = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0).expand(batch, -1)
    mask = transformers.masking_utils.create_sliding_window_causal_mask(
        config=model.config, inputs_embeds=inputs_embeds, attention_mask=None, past_key_values=None,
        position_ids=positions)
    attention = dict(
        position_embeddings={kind: inner.rotary_emb(inputs_embeds, position_ids=positions, layer_type=kind)
                             for kind in ("main", "compress")},
        position_ids=positions, attention_mask=mask, past_key_values=None)
    hidden = inputs_embeds.unsqueeze(2).repeat(1, 1, model.config.hc_mult, 1)
    ids = input_ids.view(batch, seq_len).long()
    residual = post = comb = None
    for layer in layers:
        hidden, residual, post, comb = layer(hidden, residual, post, comb, ids, attention)
    return inner.norm(inner.hc_head(hyper_post(hidden, residual, post, comb)))


def forward(model, inputs_embeds, layers=None, input_ids=None):
    """The decoder stack in vLLM's layout (`layers`, else the hooked ones of
    `add_reflections`); the final norm adds the last residual."""
    if model.config.model_type == "deepseek_v4":
        return forward_v4(model, inputs_embeds, input_ids, model.poc_layers if layers is None else layers)
    if model.config.model_type == "glm5_next":
        # The language model alone (the runner passes embeddings), its final norm included.
        assert layers is None and model.poc_layers is None, "nothing hooks GLM-5.3-Flash's layers"
        return model.model.language_model(inputs_embeds=inputs_embeds).last_hidden_state
    inner = model.model
    batch, seq_len, _ = inputs_embeds.shape
    positions = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0).expand(batch, -1)
    position_embeddings = inner.rotary_emb(inputs_embeds, positions)
    hidden, residual = inputs_embeds, None
    for layer in model.poc_layers if layers is None else layers:
        hidden, residual = layer(hidden, residual, position_embeddings)
    hidden, _ = fused_add_rms_norm(hidden, residual, inner.norm)
    return hidden


def artifacts(model, req, nonces):
    """The artifacts of `nonces` on `model` (reflections added): the forward, then normalise,
    pick k_dim coordinates, the Haar chain and the float16 encoding. Returns the nonces kept,
    their float32 vectors and their base64 encodings."""
    hidden_size = model.config.get_text_config().hidden_size
    block_hash, public_key, k = req["block_hash"], req["public_key"], req.get("k_dim", 12)
    device = next(model.parameters()).device
    make = generate_inputs_concat_murmur if req.get("stronger_rng") else generate_inputs
    with torch.inference_mode():
        embeds = make(block_hash, public_key, nonces, hidden_size, req["seq_len"], device, model.dtype)
        # `_generate_poc_input_ids`: pseudo token ids for DeepSeek-V4 only (the model takes the
        # embeddings above; its hash routers read the ids).
        ids = None
        if model.config.model_type == "deepseek_v4":
            ids = derive_pseudo_input_ids(block_hash, public_key, nonces, req["seq_len"], model.config.vocab_size,
                                          device)
        last = forward(model, embeds, input_ids=ids)[:, -1, :].float()

        keep = ~torch.isnan(last).any(dim=-1)
        last = last[keep]
        nonces = [n for n, kept in zip(nonces, keep.tolist()) if kept]
        last = last / (last.norm(dim=-1, keepdim=True) + 1e-8)

        indices = random_pick_indices(block_hash, public_key, nonces, hidden_size, k, device)
        y = apply_haar_rotation(block_hash, public_key, nonces, torch.gather(last, 1, indices), device)
        y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)

    halves = y.half().cpu().numpy()
    out = []
    for n, row, f32 in zip(nonces, halves, y.cpu().tolist()):
        if np.isnan(row).any():
            continue
        out.append({"nonce": n, "vector": f32, "vector_b64": base64.b64encode(row.astype("<f2").tobytes()).decode()})
    return out


def as_vllm_rounds(model):
    """Where transformers' mixtures of experts round otherwise than vLLM's (which upstream's
    PoC runs on), make them round as vLLM's: each expert's weighted output in the model dtype,
    a token's summed then (transformers' eager experts; its default grouped_mm sums unrounded
    float32 products), and MiniMax-M2's router weight and correction bias in float32 (vLLM's
    `GateLinear`, `ebias_weight_loader`). No change in float32."""
    model.config._experts_implementation = "eager"
    if model.config.model_type == "minimax_m2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.float()
                layer.mlp.e_score_correction_bias.data = layer.mlp.e_score_correction_bias.float()


def main():
    req = json.loads(sys.argv[1])
    dtype = getattr(torch, req.get("dtype", "float32"))
    # DeepSeek-V4 has eager attention only (SDPA takes no sinks); GLM-5.3-Flash's sparse mask is
    # written for either (eager, its additive form), and its checkpoint is multimodal.
    model_type = json.load(open(f"{req['dir']}/config.json"))["model_type"]
    attention = "eager" if model_type in ("deepseek_v4", "glm5_next") else "sdpa"
    auto = transformers.AutoModelForImageTextToText if model_type == "glm5_next" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(req["dir"], dtype=dtype, attn_implementation=attention)
    model.eval()
    as_vllm_rounds(model)
    add_reflections(model, req["block_hash"])
    json.dump(artifacts(model, req, req["nonces"]), sys.stdout)


if __name__ == "__main__":
    main()
