"""Tiny random Qwen2 / Qwen3 / Qwen3-MoE / MiniMax-M2 / DeepSeek-V4 / GLM-5.3-Flash (and Llama) checkpoints written with transformers, and what
transformers computes with them: the reference the engine's forward is compared against.

    python qwen_reference.py '{"arch": "qwen3", "dir": "/tmp/m", "dtype": "float32", "seed": 1,
                               "prompt": [1, 2, 3], "max_new": 8}'

`kv_cache_dtype: "fp8"` adds `fp8_kv_logits` and `fp8_kv_greedy`: greedy decoding through a KV
cache rounded to FP8 as vLLM's `--kv-cache-dtype fp8` writes it (`fp8_kv_decode`).

`config` overrides fields of the tiny config (`{"head_dim": 64}`). Writes the checkpoint to `dir` (safetensors, sharded when `shard_size` is given) and prints
JSON: `logits` for every prompt position (float32 lists) and `greedy`, the next `max_new`
tokens by argmax, each step a full forward of the whole sequence (no cache: an independent
check of ours); for a half-precision `dtype` also `logits_float32`, the same weights run in
float32, and `logits_vllm_layout`, the same forward in vLLM's decoder layout (the feed-forward's
output and the residual stream kept apart, added in float32 by the next norm:
`poc_v2_reference.forward`), whose rounding the engine follows.
"""

import json
import sys

import torch
import transformers

import poc_v2_reference


def tiny_config(arch, req=None):
    req = req or {}
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen2":
        # Qwen2.5's long-context setting: YaRN.
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
        return transformers.Qwen2Config(**common, rope_parameters=rope, tie_word_embeddings=False)
    if arch == "qwen3":
        # As Qwen3-0.6B: tied embeddings, head_dim wider than hidden/heads.
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        )
    if arch == "minimax_m2":
        # MiniMax-M2's shape in small: partial rotary (rotary_dim 16 of head_dim 32, as 64 of
        # 128), every layer sparse, top-2 of 8 experts.
        return transformers.MiniMaxM2Config(
            **{**common, "intermediate_size": 32},
            head_dim=32,
            rotary_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
        )
    if arch == "deepseek_v4":
        # DeepSeek-V4's shape in small: one key-and-value head of 64 (16 of them rotated, as 64
        # of 512), queries through a rank-48 pair, two output groups, four residual streams, a
        # window of 4 (shorter than the prompts), top-2 of 8 experts plus a shared one, the first
        # layer hash-routed; sliding-window layers, or with `"compressed": true` a sliding, a CSA
        # (an entry per 4 tokens, its indexer's 8 heads of 32 keeping the best 2: with few heads,
        # entries often score exactly 0 and top-k's choice among ties is arbitrary) and an HCA
        # layer (an entry per 8 tokens), rotating with YaRN.
        compressed = {}
        if req.get("compressed"):
            compressed = dict(
                layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                index_n_heads=8, index_head_dim=32, index_topk=2,
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            )
        return transformers.DeepseekV4Config(
            **{"layer_types": ["sliding_attention"] * 3, **compressed},
            vocab_size=320, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=64, q_lora_rank=48,
            partial_rotary_factor=0.25, o_groups=2, o_lora_rank=16, sliding_window=4,
            hc_mult=4, hc_sinkhorn_iters=20, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2,
            mlp_layer_types=["hash_moe", "moe", "moe"], swiglu_limit=0.5, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        )
    if arch == "glm5_next":
        # GLM-5.3-Flash's language model in small, its indexed attention layers only (the native
        # engine does not run its linear ones yet): MLA without rotary (4 heads, a 32-wide
        # latent, keys of 32 and values of 24 per head, queries through a rank-48 pair), four
        # residual streams, pools of 4 tokens with the indexer's 8 heads of 32 keeping the best
        # 2 pools (8 tokens) and each query's own pool's tail, layers 1 and 3 reusing the choice
        # of the layer before; a dense first layer, then top-2 of 8 experts in 4 groups of which
        # the best 2 are eligible, a shared expert, clamped SwiGLUs. A one-layer vision tower,
        # which the engine does not load.
        text = dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
            kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=0, v_head_dim=24,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
            layer_types=["indexed_attention"] * 4, index_topk=8, index_kpool=4, index_n_heads=8,
            index_head_dim=32, index_topk_pattern="FSFS", hc_mult=4, swiglu_limit=0.5,
            max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        if req.get("linear_layers"):
            # Its linear layers too (Kimi Delta Attention, three in four in the released model):
            # six layers, linear, indexed, linear, linear, indexed, indexed (the last reusing the
            # choice of the one before), 2 heads of 32 with a short convolution of 4, the
            # forget gate bounded below (`linear_lower_bound`, the released model's) or, with
            # `"lower_bound": null`, its softplus form.
            text.update(
                num_hidden_layers=6, mlp_layer_types=["dense"] + ["sparse"] * 5,
                layer_types=["linear_attention", "indexed_attention", "linear_attention", "linear_attention",
                             "indexed_attention", "indexed_attention"],
                index_topk_pattern="FFFFFS", linear_num_heads=2, linear_head_dim=32,
                linear_conv_kernel_dim=4, linear_lower_bound=req.get("lower_bound", -5.0),
            )
        vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64,
                      projection_intermediate_size=32, patch_size=4, image_size=16)
        return transformers.Glm5NextConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    if arch == "llama":
        # An architecture the native engine does not run (the vLLM engine's tests serve it).
        return transformers.LlamaConfig(**common, head_dim=64, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    raise SystemExit(f"unknown arch {arch}")


# A ChatML template in the style of Qwen's (a default system turn, python-style string methods
# that Jinja engines other than Python's must emulate), written for these tests.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'].strip() %}"
    "{%- if message['role'] == 'user' and content.startswith('/think') %}"
    "{{- '<|im_start|>user\\n' + content[6:].lstrip() + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Proof of compute: every nonce is an artifact, and weight is throughput.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Kubernetes operators reconcile desired state into running pods.",
    "Numbers like 12345 and 67890 split into digits: 3.14159.",
    "Unicode: café, naïve, 東京, emoji 🚀 too.",
]


def write_tokenizer(directory, vocab_size, added=()):
    """A byte-level BPE in Qwen's shape (Qwen2's split pattern, byte-level decoder, ChatML
    special tokens), trained on a few sentences so its ids fit the tiny model's vocabulary;
    `added`: more tokens kept whole, not special (MiniMax-M2's `<think>` and tool-call markers,
    whose text answer parsers read)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials) - len(added),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(specials)
    tok.add_tokens(list(added))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(directory)
    return fast


def model_class(arch):
    return {
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
        "minimax_m2": transformers.MiniMaxM2ForCausalLM,
        "deepseek_v4": transformers.DeepseekV4ForCausalLM,
        "glm5_next": transformers.Glm5NextForConditionalGeneration,
        "llama": transformers.LlamaForCausalLM,
    }[arch]


def randomise(model, seed):
    # Random everything, norms and biases included (their defaults, ones and zeros, would hide a
    # weight loaded into the wrong place), large enough that argmax is decisive.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("_hc.scale") or name.endswith("hc_head.hc_scale"):
                # DeepSeek-V4's hyper-connection scales (ones by default): near one, so the
                # streams' weights vary with the tokens.
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("forget_gate.dt_bias"):
                # KDA's forget gate: near -4 (as its inverse-softplus init is, about), so the
                # recurrent state keeps most of what it held each token and the past shows.
                p.copy_(noise * 0.5 - 4.0)
            elif name.endswith("embed_tokens.weight"):
                # Small next to what the layers add, so tied checkpoints don't just echo the input.
                p.copy_(0.1 * noise)
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 64
                p.copy_(noise * (1.5 / fan_in**0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # MiniMax-M2's router bias (a buffer, zeros by default): as large as the sigmoid
                # scores' spread, so it changes which experts are chosen.
                b.copy_(0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float32))
            elif name.endswith("tid2eid"):
                # DeepSeek-V4's token → experts table (zeros by default): distinct experts per
                # token, at random.
                experts = model.config.n_routed_experts
                picks = torch.rand(b.shape[0], experts, generator=gen).argsort(-1)[:, : b.shape[1]]
                b.copy_(picks)


# The projections an FP8 release quantises; the router, norms, embeddings and lm_head stay.
FP8_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", ".w1.", ".w2.", ".w3.")

# What GLM-5.3-Flash's FP8 release quantises, as vLLM 0.32 reads it: the MLPs (dense, shared and
# routed experts) and the indexer's `wk`; the linear layers' and MLA's projections carry no
# scales there and stay unquantised, as do the routers.
GLM_FP8_PROJECTIONS = ("mlp.experts.", "mlp.shared_experts.", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                       "indexer.wk.")


def fp8_quantise_weight(w, block, power_of_two=False):
    """One weight `[out, in]` in e4m3 with a float32 factor per `block` ([rows, columns]; edge
    blocks partial), each block's largest magnitude at e4m3's largest (448), or with
    `power_of_two` the power of two above that (UE8M0 factors): the e4m3 weight, the factors
    `[ceil(out/rows), ceil(in/columns)]` and the factors expanded to the weight."""
    rows, columns = block
    out_dim, in_dim = w.shape
    nr, nc = -(-out_dim // rows), -(-in_dim // columns)
    padded = torch.zeros(nr * rows, nc * columns, dtype=torch.float32)
    padded[:out_dim, :in_dim] = w.float()
    blocks = padded.view(nr, rows, nc, columns)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    factors = scale.repeat_interleave(rows, 0).repeat_interleave(columns, 1)[:out_dim, :in_dim]
    return (w.float() / factors).to(torch.float8_e4m3fn), scale.contiguous(), factors


def fp8_quantise(directory, block, projections=FP8_PROJECTIONS):
    """Quantises the checkpoint in `directory` as DeepSeek's and MiniMax's FP8 releases are: each
    projection's weight (a name holding one of `projections`) in e4m3 with a float32 `weight_scale_inv` per `block` ([rows, columns];
    edge blocks partial), scaled so its largest magnitude is e4m3's largest (448), and
    `quantization_config` in config.json. Returns a directory holding the same model with the
    dequantised weights (e4m3 × factor, in float32, then the checkpoint's dtype) in their
    place, unquantised: what transformers runs as the reference."""
    from safetensors.torch import load_file

    rows, columns = block
    tensors = load_file(f"{directory}/model.safetensors")
    quantised, dequantised = {}, {}
    for name, w in tensors.items():
        if w.dim() != 2 or not name.endswith(".weight") or not any(p in name for p in projections):
            quantised[name] = dequantised[name] = w
            continue
        q, scale, factors = fp8_quantise_weight(w, block)
        quantised[name] = q
        quantised[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
        dequantised[name] = (q.float() * factors).to(w.dtype)
    quantization = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                    "weight_block_size": [rows, columns]}
    return write_quantised(directory, quantised, dequantised, {"quantization_config": quantization})


def write_quantised(directory, quantised, dequantised, config_fields):
    """Writes the `quantised` tensors as the checkpoint in `directory`, `config_fields` added to
    its config.json, and the `dequantised` ones unquantised in a directory of their own, which
    it returns: what transformers runs as the reference. That directory sits inside the model's
    (the engine reads only its top level), gone with it."""
    import os
    import shutil

    from safetensors.torch import save_file

    reference = f"{directory}/dequantised-reference"
    os.makedirs(reference)
    for f in os.listdir(directory):
        if f != "model.safetensors" and os.path.isfile(f"{directory}/{f}"):
            shutil.copy(f"{directory}/{f}", reference)
    save_file(dequantised, f"{reference}/model.safetensors", metadata={"format": "pt"})
    save_file(quantised, f"{directory}/model.safetensors", metadata={"format": "pt"})
    with open(f"{directory}/config.json") as f:
        cfg = json.load(f)
    cfg.update(config_fields)
    with open(f"{directory}/config.json", "w") as f:
        json.dump(cfg, f)
    return reference


# E2M1's sixteen values by code (sign in the top bit), as transformers unpacks them.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_quantise_weight(w):
    """One weight `[out, in]` as MXFP4 (the OCP microscaling format DeepSeek-V4's routed experts
    ship in): per 32 columns a power-of-two scale, its exponent as a UE8M0 byte, the largest
    magnitude's exponent less e2m1's largest (2); each value the nearest e2m1 code, two codes a
    byte, the even column in the low nibble. Returns the bytes `[out, in/2]` (int8), the
    exponents `[out, in/32]` (float8_e8m0fnu) and the weight they encode (float32)."""
    out_dim, in_dim = w.shape
    groups = w.float().reshape(out_dim, in_dim // 32, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0 ** -100)
    exponent = torch.floor(torch.log2(amax)) - 2
    scaled = groups / torch.exp2(exponent)
    codes = (scaled.unsqueeze(-1) - E2M1).abs().argmin(dim=-1).reshape(out_dim, in_dim)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    scales = torch.exp2(exponent).reshape(out_dim, in_dim // 32).to(torch.float8_e8m0fnu)
    encoded = (E2M1[codes].reshape(out_dim, in_dim // 32, 32) * torch.exp2(exponent)).reshape(out_dim, in_dim)
    return packed.contiguous(), scales.contiguous(), encoded


def v4_release_quantise(directory, block):
    """Quantises a DeepSeek-V4 checkpoint (in its released tensor names) as DeepSeek-V4-Flash
    ships: the routed experts' w1/w2/w3 MXFP4 (`expert_dtype: fp4`), the other projections FP8
    in `block`s with power-of-two (UE8M0) factors, every factor under `<name>.scale` as
    float8_e8m0fnu; the router, norms, embedding, head, hyper-connections and sinks as they are.
    Returns a directory holding the weights these encode, unquantised, as transformers' own
    reader of the format (`Fp8Dequantize`, which derives each block from the factors' grid, so
    `block` must divide every projection) widens them: the reference."""
    import re

    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    def widened(q, scale, w, encoded):
        wide = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32)
        assert torch.equal(wide, encoded), "transformers reads the quantised weight as written"
        return wide.to(w.dtype)

    tensors = load_file(f"{directory}/model.safetensors")
    fp8 = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|wgate|shared_experts\.w[123])\.weight$")
    expert = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
    quantised, dequantised = {}, {}
    for name, w in tensors.items():
        stem = name.removesuffix(".weight")
        if expert.search(name):
            packed, scales, encoded = mxfp4_quantise_weight(w)
            quantised[name], quantised[f"{stem}.scale"] = packed, scales
            dequantised[name] = widened(packed, scales, w, encoded)
        elif fp8.search(name):
            q, scale, factors = fp8_quantise_weight(w, block, power_of_two=True)
            quantised[name], quantised[f"{stem}.scale"] = q, scale.to(torch.float8_e8m0fnu)
            dequantised[name] = widened(q, quantised[f"{stem}.scale"], w, q.float() * factors)
        else:
            quantised[name] = dequantised[name] = w
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
                    "weight_block_size": list(block)}
    return write_quantised(directory, quantised, dequantised,
                           {"quantization_config": quantization, "expert_dtype": "fp4"})


def minimax_m2_ablations(directory, dtype, ids):
    """MiniMax-M2's logits with one of its differences from Qwen3-MoE undone at a time: a test
    model in which each shows."""
    out = {}
    full = transformers.MiniMaxM2Config.from_pretrained(directory)
    full.rotary_dim = full.head_dim
    full.rope_parameters = {**full.rope_parameters, "partial_rotary_factor": 1.0}
    model = transformers.MiniMaxM2ForCausalLM.from_pretrained(directory, config=full, dtype=dtype).eval()
    with torch.no_grad():
        out["full_rotary"] = model(ids).logits[0].float().tolist()
    model = transformers.MiniMaxM2ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.zero_()
        out["bias_zeroed"] = model(ids).logits[0].float().tolist()
    model = transformers.MiniMaxM2ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    head_dim = model.config.head_dim

    def per_head(norm):
        # Each head's values normalised apart, with its slice of the layer-wide weight.
        def forward(x):
            heads = x.view(*x.shape[:-1], -1, head_dim).float()
            heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * heads.view(x.shape).to(x.dtype)
        return forward

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.forward = per_head(layer.self_attn.q_norm)
            layer.self_attn.k_norm.forward = per_head(layer.self_attn.k_norm)
        out["qk_norm_per_head"] = model(ids).logits[0].float().tolist()
    return out


def fp8_kv_decode(model, prompt, steps):
    """Greedy decoding through a KV cache that keeps keys and values in FP8 e4m3, saturated at
    ±448 with scale 1 (what vLLM's `--kv-cache-dtype fp8` writes without calibrated scales): the
    prompt attends its keys as computed, every later step what the cache holds, its own new keys
    too. Each step's last logits and the tokens."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    def rounded(x):
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)

    original = DynamicLayer.update

    def update(self, keys, values, *args, **kwargs):
        fresh = not self.is_initialized
        all_keys, all_values = original(self, rounded(keys), rounded(values), *args, **kwargs)
        return (keys, values) if fresh else (all_keys, all_values)

    DynamicLayer.update = update
    try:
        cache = DynamicCache()
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        logits, tokens = [out.logits[0, -1].float().tolist()], []
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].float().argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float().tolist())
    finally:
        DynamicLayer.update = original
    return {"fp8_kv_logits": logits, "fp8_kv_greedy": tokens}


def main():
    req = json.loads(sys.argv[1])
    arch = req["arch"]
    dtype = getattr(torch, req.get("dtype", "float32"))
    config = tiny_config(arch, req)
    # Overrides, e.g. {"head_dim": 64}: vLLM's CPU attention refuses heads narrower than 64.
    for key, value in req.get("config", {}).items():
        setattr(config, key, value)
    model = model_class(arch)(config).eval()
    randomise(model, req.get("seed", 0))
    model = model.to(dtype)
    save = {}
    if req.get("shard_size"):
        save["max_shard_size"] = req["shard_size"]
    model.save_pretrained(req["dir"], **save)
    if req.get("tokenizer"):
        tokenizer = write_tokenizer(req["dir"], config.get_text_config().vocab_size, req.get("added_tokens", ()))
        with open(f"{req['dir']}/generation_config.json", "w") as f:
            json.dump({"eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                        tokenizer.convert_tokens_to_ids("<|endoftext|>")]}, f)
    if req.get("old_config_spelling"):
        # Checkpoints written by transformers 4 (every released Qwen2.5/Qwen3) spell rope as
        # rope_theta + rope_scaling {"type": ...}.
        path = f"{req['dir']}/config.json"
        with open(path) as f:
            cfg = json.load(f)
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = None if params["type"] == "default" else params
        cfg["torch_dtype"] = cfg.pop("dtype")
        with open(path, "w") as f:
            json.dump(cfg, f)

    if req.get("released_spelling") and arch == "deepseek_v4":
        # DeepSeek-V4's released tensor names (what transformers' conversion mapping reads):
        # no `model.` prefix, `embed.weight`, `hc_head_fn`/`_base`/`_scale` at the root; the
        # layers' names are the released ones already. And an `mtp.` module, which loading
        # leaves out.
        from safetensors.torch import load_file, save_file

        path = f"{req['dir']}/model.safetensors"
        tensors = load_file(path)
        renamed = {}
        for name, t in tensors.items():
            name = name.removeprefix("model.")
            name = {"embed_tokens.weight": "embed.weight"}.get(name, name)
            name = name.replace("hc_head.hc_", "hc_head_")
            renamed[name] = t
        renamed["mtp.0.norm.weight"] = torch.ones(config.hidden_size)
        save_file(renamed, path, metadata={"format": "pt"})
    elif req.get("released_spelling"):
        # MiniMax-M2's released config.json: rope_theta and rotary_dim at the top level, no
        # rope_parameters.
        path = f"{req['dir']}/config.json"
        with open(path) as f:
            cfg = json.load(f)
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params["rope_theta"]
        cfg.update({"scoring_func": "sigmoid", "use_qk_norm": True, "qk_norm_type": "per_layer",
                    "use_routing_bias": True, "attn_type_list": [1] * cfg["num_hidden_layers"]})
        with open(path, "w") as f:
            json.dump(cfg, f)

    reference_dir = req["dir"]
    if req.get("release_quantised") and arch == "deepseek_v4":
        reference_dir = v4_release_quantise(req["dir"], req.get("fp8_block", [128, 128]))
    elif req.get("release_quantised") and arch == "glm5_next":
        reference_dir = fp8_quantise(req["dir"], req["fp8_block"], GLM_FP8_PROJECTIONS)
    elif req.get("fp8_block"):
        reference_dir = fp8_quantise(req["dir"], req["fp8_block"])

    # The reference runs what transformers loads from that directory, as a user would.
    # (DeepSeek-V4 has eager attention only: SDPA takes no sinks. GLM-5.3-Flash's sparse mask
    # is written for either; eager is its additive form.)
    attention = "eager" if arch in ("deepseek_v4", "glm5_next") else "sdpa"
    model = model_class(arch).from_pretrained(reference_dir, dtype=dtype, attn_implementation=attention).eval()
    prompt = req["prompt"]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(ids).logits[0].float()
        greedy = []
        seq = list(prompt)
        for _ in range(req.get("max_new", 0)):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].float().argmax())
            greedy.append(nxt)
            seq.append(nxt)
    out = {"logits": logits.tolist(), "greedy": greedy}
    if req.get("ablations"):
        out.update(minimax_m2_ablations(req["dir"], dtype, ids))
    if req.get("kv_cache_dtype") == "fp8":
        with torch.no_grad():
            out.update(fp8_kv_decode(model, prompt, req.get("max_new", 0)))
    if dtype != torch.float32:
        # The same (rounded) weights run in float32: the truth both low-precision forwards
        # approximate.
        truth = model_class(arch).from_pretrained(reference_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out["logits_float32"] = truth(ids).logits[0].tolist()
        if arch in ("deepseek_v4", "glm5_next"):
            # How vLLM rounds its layer in bfloat16 is not restated (poc_v2_reference has its
            # layer's order, compared in float32 only).
            json.dump(out, sys.stdout)
            return
        with torch.no_grad():
            poc_v2_reference.as_vllm_rounds(model)
            hidden = poc_v2_reference.forward(model, model.model.embed_tokens(ids), poc_v2_reference.vllm_layers(model))
            out["logits_vllm_layout"] = model.lm_head(hidden)[0].float().tolist()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
