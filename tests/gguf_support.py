"""A test-side llama.cpp converter: writes a Hugging Face folder (config.json, model.safetensors,
tokenizer files) as a float32 GGUF file the way llama.cpp's convert_hf_to_gguf.py does, so the
GGUF loader can be checked against transformers on the same weights without llama.cpp.

What it reproduces, per Hugging Face architecture (`CONVERSIONS`):

- metadata: each converter class's `set_gguf_parameters` (TextModel's shared keys, LlamaModel's
  vocab size and RoPE dimensions, Gemma 2's and Phi-3's own lists, Gemma 3's and Qwen3-MoE's
  additions);
- tensors: names through gguf-py's own tensor map (`gguf.get_tensor_name_map`, the converter's
  `map_tensor_name`), with the converter's transforms: Q/K rows permuted (LlamaModel), 1 added to
  Gemma's norm weights, Gemma's lm_head dropped, each layer's experts stacked into one tensor
  (Mixtral, Qwen3-MoE), Phi-3's LongRoPE factors as `rope_factors_long/short` tensors;
- the tokenizer: `_set_vocab_gpt2` for a `tokenizer.json` (tokens spelled as the tokenizer's
  vocabulary, added special tokens CONTROL and the others USER_DEFINED) and
  `_set_vocab_sentencepiece` for a `tokenizer.model`, then gguf-py's `SpecialVocab` (merges,
  special ids, add_bos/add_eos, chat template), as the converter calls it.

Two departures, both explicit arguments: the converter names the pre-tokenizer by hashing the
tokenizer's output on a fixed text (and refuses tokenizers it does not know); here the caller
names it (`pre`). And Gemma 3's converter stores no sliding-window layout (llama.cpp assumes five
windowed layers to one global): where a config's layout differs from that, the per-layer flags
go into `gemma3.attention.sliding_window_pattern` (the key llama.cpp reads for other models).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable, Optional

import gguf
import numpy as np

Writer = gguf.GGUFWriter


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What convert_hf_to_gguf.py does for one Hugging Face architecture."""

    arch: gguf.MODEL_ARCH
    metadata: Callable[[Writer, dict], None]     # set_gguf_parameters
    permute_qk: bool = False                     # LlamaModel.modify_tensors
    norm_shift: float = 0.0                      # Gemma: + 1 on every "*norm.weight"
    drop_lm_head: bool = False                   # Gemma: lm_head.weight is skipped
    # generate_extra_tensors: (config.json, writer) -> more tensors (and their metadata)
    extra_tensors: Optional[Callable[[dict, Writer], dict]] = None
    sentencepiece_space_prefix: Optional[bool] = None  # add_add_space_prefix after the vocab


# ----------------------------------------------------------------------------- metadata

def rope_parameters(cfg: dict) -> dict:
    """The converter's `rope_parameters`: transformers 5's rope_parameters, else 4's rope_scaling
    with rope_theta."""
    return cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}),
                                          "rope_theta": cfg.get("rope_theta")}


def text_model(w: Writer, cfg: dict) -> None:
    """TextModel.set_gguf_parameters: the keys every architecture shares."""
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    rope = rope_parameters(cfg)
    full = rope.get("full_attention", rope)
    if full.get("rope_type") == "linear" and full.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    if full.get("rope_theta") is not None:
        w.add_rope_freq_base(full["rope_theta"])
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if experts is not None:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def llama_model(w: Writer, cfg: dict) -> None:
    text_model(w, cfg)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg.get("head_dim")
                               or cfg["hidden_size"] // cfg["num_attention_heads"])


def qwen3moe_model(w: Writer, cfg: dict) -> None:
    text_model(w, cfg)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def gemma2_model(w: Writer, cfg: dict) -> None:
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])


def gemma3_model(w: Writer, cfg: dict) -> None:
    """Gemma3Model.set_gguf_parameters, less the keys it writes twice (TextModel's already
    hold the same values: the global layers' RoPE base, heads, eps, head_dim)."""
    text_model(w, cfg)
    assert cfg.get("attn_logit_softcapping") is None
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(cfg["sliding_window"])
    # Not the converter's (see the module docstring): a layout llama.cpp's default misses.
    sliding = [t == "sliding_attention" for t in cfg["layer_types"]]
    if sliding != [i % 6 < 5 for i in range(len(sliding))]:
        w.add_sliding_window_pattern(sliding)


def phi3_model(w: Writer, cfg: dict) -> None:
    rope = rope_parameters(cfg)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_sliding_window(cfg.get("sliding_window") or 0)


def phi3_rope_factors(cfg: dict, w: Writer) -> dict:
    """Phi3MiniModel.generate_extra_tensors: LongRoPE factors and their attention factor."""
    rope = rope_parameters(cfg)
    if not rope.get("long_factor"):
        return {}
    original = rope["original_max_position_embeddings"]
    scale = cfg["max_position_embeddings"] / original
    w.add_rope_scaling_attn_factors(
        np.sqrt(1 + np.log(scale) / np.log(original)) if scale > 1.0 else 1.0)
    return {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}


CONVERSIONS = {
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
                    Conversion(gguf.MODEL_ARCH.LLAMA, llama_model, permute_qk=True)),
    "Qwen2ForCausalLM": Conversion(gguf.MODEL_ARCH.QWEN2, text_model),
    "Qwen3ForCausalLM": Conversion(gguf.MODEL_ARCH.QWEN3, text_model),
    "Qwen3MoeForCausalLM": Conversion(gguf.MODEL_ARCH.QWEN3MOE, qwen3moe_model),
    "Gemma2ForCausalLM": Conversion(gguf.MODEL_ARCH.GEMMA2, gemma2_model, norm_shift=1.0,
                                    drop_lm_head=True, sentencepiece_space_prefix=False),
    "Gemma3ForCausalLM": Conversion(gguf.MODEL_ARCH.GEMMA3, gemma3_model, norm_shift=1.0,
                                    drop_lm_head=True, sentencepiece_space_prefix=False),
    "Phi3ForCausalLM": Conversion(gguf.MODEL_ARCH.PHI3, phi3_model,
                                  extra_tensors=phi3_rope_factors),
}


# ----------------------------------------------------------------------------- tensors

def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: rows of each head reordered for llama.cpp's interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.weight$")


def _stack_experts(tensors: dict) -> dict:
    """Each layer's per-expert tensors stacked over experts into one
    `{prefix}.experts.{name}.weight` (the converter's `_experts` merge); Mixtral's names as its
    LlamaModel writes them (`layers.{i}.feed_forward.experts.w1.weight`)."""
    out, groups = {}, {}
    for name, w in tensors.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = w
            continue
        prefix, expert, which = match.groups()
        groups.setdefault((prefix, which), {})[int(expert)] = w
    for (prefix, which), experts in groups.items():
        stacked = np.stack([experts[e] for e in range(len(experts))])
        mixtral = re.match(r"^model\.layers\.(\d+)\.block_sparse_moe$", prefix)
        if mixtral:
            prefix = f"layers.{mixtral.group(1)}.feed_forward"
        out[f"{prefix}.experts.{which}.weight"] = stacked
    return out


def convert_tensors(folder: pathlib.Path, cfg: dict, conv: Conversion) -> dict:
    """GGUF name -> float32 array of the folder's model.safetensors, as the converter writes
    them."""
    from safetensors.numpy import load_file
    tensors = {k: v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = gguf.get_tensor_name_map(conv.arch, cfg["num_hidden_layers"])
    out = {}
    for name, w in _stack_experts(tensors).items():
        if conv.drop_lm_head and name == "lm_head.weight":
            continue
        if conv.norm_shift and name.endswith("norm.weight"):
            w = w + np.float32(conv.norm_shift)
        if conv.permute_qk and name.endswith("q_proj.weight"):
            w = permute(w, heads)
        if conv.permute_qk and name.endswith("k_proj.weight"):
            w = permute(w, kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"the converter has no GGUF name for {name}"
        out[gguf_name] = w
    return out


# ----------------------------------------------------------------------------- tokenizer

def gpt2_vocab(w: Writer, folder: pathlib.Path, vocab_size: int, pre: str) -> None:
    """TextModel._set_vocab_gpt2 (get_vocab_base): the tokenizer's vocabulary by id, padded
    with [PAD{i}] to vocab_size; added tokens CONTROL when special, else USER_DEFINED."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    reverse = {i: tok for tok, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)


def looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def sentencepiece_vocab(w: Writer, folder: pathlib.Path, vocab_size: int) -> None:
    """TextModel._set_vocab_sentencepiece: tokenizer.model's pieces, scores and types, padded
    with [PAD{i}] to vocab_size; tokenizer_config's added_tokens_decoder then marks its tokens
    CONTROL (special, or looking special) or USER_DEFINED."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                    gguf.TokenType.CONTROL if sp.is_control(i) else
                    gguf.TokenType.UNUSED if sp.is_unused(i) else
                    gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for token_id, data in config.get("added_tokens_decoder", {}).items():
        token_id, token = int(token_id), data["content"]
        scores[token_id] = -1000.0
        if data.get("special") or looks_special(token):
            tokens[token_id], types[token_id] = token, gguf.TokenType.CONTROL
        else:  # user-defined pieces are stored with spaces for "\u2581" (Gemma's runs of them)
            tokens[token_id] = token.replace("\u2581", " ")
            types[token_id] = gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def write_vocab(w: Writer, folder: pathlib.Path, vocab_size: int, pre: str,
                space_prefix: Optional[bool] = None) -> None:
    """The folder's tokenizer: sentencepiece where it has a tokenizer.model, else tokenizer.json
    as a `gpt2` vocabulary."""
    if (folder / "tokenizer.model").is_file():
        sentencepiece_vocab(w, folder, vocab_size)
        if space_prefix is not None:
            w.add_add_space_prefix(space_prefix)
    else:
        gpt2_vocab(w, folder, vocab_size, pre)


def finish(w: Writer, tensors: dict) -> None:
    """Adds `tensors` (float32) and writes the file."""
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- entry points

def convert(folder: str | pathlib.Path, out: str | pathlib.Path, *, pre: str = "smollm"
            ) -> pathlib.Path:
    """Writes the Hugging Face folder as the float32 GGUF file `out` (the converter's
    `--outtype f32`); `pre` is the byte-level pre-tokenizer's name."""
    folder, out = pathlib.Path(folder), pathlib.Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    conv = CONVERSIONS[cfg["architectures"][0]]
    w = Writer(str(out), gguf.MODEL_ARCH_NAMES[conv.arch])
    w.add_name(folder.name)
    conv.metadata(w, cfg)
    tensors = convert_tensors(folder, cfg, conv)
    if conv.extra_tensors is not None:
        tensors |= conv.extra_tensors(cfg, w)
    write_vocab(w, folder, cfg["vocab_size"], pre, conv.sentencepiece_space_prefix)
    finish(w, tensors)
    return out


def convert_vocab(folder: str | pathlib.Path, out: str | pathlib.Path, arch: str, *,
                  pre: str = "default", space_prefix: Optional[bool] = None) -> pathlib.Path:
    """A vocabulary-only GGUF (the converter's `--vocab-only`) of the folder's tokenizer, for
    architecture `arch`."""
    folder, out = pathlib.Path(folder), pathlib.Path(out)
    import transformers
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(str(folder)))
    w = Writer(str(out), arch)
    write_vocab(w, folder, vocab_size, pre, space_prefix)
    finish(w, {})
    return out
