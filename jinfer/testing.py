"""Tiny random models for tests and benchmarks: a Llama folder (config.json, model.safetensors,
tokenizer.json with ChatML special tokens) written with NumPy alone, no torch and no download;
and spread-out random weights of any ModelConfig (`spread_params`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Why is the sky blue? Because of Rayleigh "
    "scattering. 日本語のテキスト。 Emoji 🙂🚀 and accents: café, naïve, über. Tabs\tand\n"
    "newlines, numbers 12345 and 3.14159. ") * 20


def _train_tokenizer(folder: pathlib.Path) -> int:
    """A byte-level BPE tokenizer.json with ChatML special tokens; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


def write_tiny_llama(folder: pathlib.Path, *, seed: int = 0, tie: bool = True,
                     hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128) -> pathlib.Path:
    """Writes config.json, model.safetensors and a tokenizer: a random Llama, no torch needed."""
    from safetensors.numpy import save_file
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(folder)
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5),
               "model.norm.weight": 1 + w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + w(hidden),
            p + "post_attention_layernorm.weight": 1 + w(hidden),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
        }
    if not tie:
        tensors["lm_head.weight"] = w(vocab, hidden, scale=0.5)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": tie,
        "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32"}))
    return folder


def spread_params(config, seed: int = 0) -> dict:
    """Loader-layout float32 NumPy weights of `config` (jinfer.model.decoder.param_shapes) whose
    logits are spread out (no near-ties for greedy decoding), the same for a seed in every
    process: norms 1 + N(0, 0.1^2), embeddings and LM head N(0, 0.5^2), the rest N(0, 0.15^2)."""
    from jinfer.model.decoder import param_shapes
    rng = np.random.default_rng(seed)

    def leaf(name, shape):
        if name.endswith("norm"):
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        scale = 0.5 if name in ("embed", "lm_head") else 0.15
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    sizes = param_shapes(config)
    params = {name: leaf(name, s) for name, s in sizes.items() if name != "layers"}
    params["layers"] = {name: leaf(name, s) for name, s in sizes["layers"].items()}
    return params
