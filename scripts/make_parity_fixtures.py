"""Tiny random Hugging Face Llama-family folders for parity tests against transformers.

Each family mirrors a real checkpoint's layout at toy size (CPU torch, float32):

  llama2   LlamaConfig, rope_theta 1e4, untied, sentencepiece `tokenizer.model` (BPE, byte
           fallback) loaded by transformers' LlamaTokenizer.
  llama3   llama3 RoPE scaling (factor 8, low 1, high 4, original_max_position_embeddings 64 so
           short test prompts already reach the scaled regime), rope_theta 5e5, untied, byte-level
           BPE `tokenizer.json` with <|begin_of_text|> added by a TemplateProcessing
           post-processor, Llama 3 chat template.
  smollm2  tied embeddings, rope_theta 1e5, 9 query / 3 KV heads of 16 dims (hidden 144),
           byte-level BPE `tokenizer.json`, ChatML template with <|im_start|>/<|im_end|>.

and the other decoder families (tests/test_families.py), each with its own config class and a
byte-level BPE tokenizer with the family's special tokens and chat template; windows are a few
tokens so short prompts already slide past them:

  qwen2    Q/K/V biases, tied embeddings, ChatML.
  qwen3    per-head q/k norms, head_dim 32 of hidden 64 / 4 heads, untied, ChatML.
  mistral  an 8-token sliding window on every layer, [INST] template.
  gemma2   (1 + w) norms, post norms, GeGLU, sqrt(hidden) embeddings, query_pre_attn_scalar 24,
           8-token windows on alternate layers, attention and final logit soft-caps.
  gemma3   q/k norms, two windowed layers to one global (sliding_window_pattern 3), RoPE base
           1e4 on the windowed layers and 1e5 with linear scaling 2 on the global ones.
  phi3     fused qkv_proj / gate_up_proj, LongRoPE (original context 32 of 256, so prompts past
           32 tokens take the long factors), a 16-token sliding window, <|end|> turns.
  mixtral  4 experts, 2 per token (renormalised), an 8-token sliding window, [INST] template.
  qwen3_moe  q/k norms, 4 experts of 32, 2 per token (not renormalised: norm_topk_prob false),
           ChatML.

Weights are re-drawn after transformers' init (which uses std 0.02 and unit norms, making
attention nearly uniform and RoPE errors invisible): linear layers ~ N(0, 1/fan_in), embeddings
~ N(0, 0.5^2) (N(0, 4/hidden) when tied, else greedy decoding just repeats the last token), norm
weights ~ 1 + N(0, 0.1^2), so attention is peaked and logits are well spread.

Importable (tests call `make_fixture`) and a CLI:

    python scripts/make_parity_fixtures.py OUT_DIR [--families llama2 llama3 smollm2 qwen2 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FAMILIES = ("llama2", "llama3", "smollm2")  # LlamaForCausalLM (tests/test_parity_hf.py)
OTHER_FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral",
                  "qwen3_moe")  # test_families.py
ALL_FAMILIES = FAMILIES + OTHER_FAMILIES

# Text the tiny tokenizers are trained on (kept in this file: no network, no datasets).
TRAIN_TEXT = [
    "Hello world, this is a small corpus for a tiny test tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's a sunny day!",
    "Numbers like 12345 and 3.14159 appear in text, as do dates: 2024-01-01.",
    "Caf\u00e9, na\u00efve, \u00fcber, se\u00f1or: accents are common in European languages.",
    "def square(x):\n    return x * x\n",
    "Tabs\tseparate\tcolumns\tin\tfiles.",
    "They've said we're ready, and I'm sure they don't mind.",
    "The model answers questions about the sky, the sea and the mountains.",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002",
] * 20

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n'"
    " + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Model shapes per family (LlamaConfig keywords besides vocab and special-token ids).
MODEL_SHAPES = {
    "llama2": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   max_position_embeddings=512, tie_word_embeddings=False),
    "llama3": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64},
                   max_position_embeddings=512, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=144, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                    max_position_embeddings=512, tie_word_embeddings=True),
}


# transformers config class and keywords (besides vocab and special-token ids) of the other
# decoder families.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
FAMILY_SHAPES = {
    "qwen2": ("Qwen2Config", dict(_SMALL, num_hidden_layers=2, rms_norm_eps=1e-6,
                                  rope_theta=10000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_SMALL, num_hidden_layers=2, head_dim=32, rms_norm_eps=1e-6,
                                  rope_theta=10000.0, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_SMALL, num_hidden_layers=2, rms_norm_eps=1e-5,
                                      rope_theta=10000.0, sliding_window=8,
                                      tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(_SMALL, num_hidden_layers=3, head_dim=16, rms_norm_eps=1e-6,
                                    rope_theta=10000.0, query_pre_attn_scalar=24,
                                    sliding_window=8, attn_logit_softcapping=3.0,
                                    final_logit_softcapping=6.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(_SMALL, num_hidden_layers=4, head_dim=16,
                                        rms_norm_eps=1e-6, rope_theta=100000.0,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0},
                                        rope_local_base_freq=10000.0, query_pre_attn_scalar=20,
                                        sliding_window=8, sliding_window_pattern=3,
                                        tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(_SMALL, num_hidden_layers=2, rms_norm_eps=1e-5,
                                rope_theta=10000.0, original_max_position_embeddings=32,
                                rope_scaling={"type": "longrope",
                                              "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5,
                                                               3.0],
                                              "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0,
                                                              12.0]},
                                sliding_window=16, tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", dict(_SMALL, num_hidden_layers=2, rms_norm_eps=1e-5,
                                      rope_theta=10000.0, sliding_window=8, num_local_experts=4,
                                      num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_SMALL, num_hidden_layers=2, head_dim=16,
                                         rms_norm_eps=1e-6, rope_theta=10000.0, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=False, tie_word_embeddings=False)),
}
# Norm weights of (1 + w) norms are drawn around 0, the others around 1.
ZERO_CENTRED_NORMS = ("gemma2", "gemma3")

# ----------------------------------------------------------------------------- tokenizers

def build_llama2_tokenizer(folder: pathlib.Path, vocab_size: int = 400) -> dict:
    """Trains a sentencepiece BPE (byte fallback) into folder/tokenizer.model; returns the
    special-token ids {"vocab_size", "bos", "eos", "pad"}."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 512,
        "chat_template": (
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}"
            "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return {"vocab_size": sp.get_piece_size(), "bos": 1, "eos": 2, "pad": None}


def _train_bytelevel(specials: list[str], split_regex: Optional[str], vocab_size: int):
    """Byte-level BPE (GPT-2 alphabet) trained on TRAIN_TEXT; specials get ids 0..n-1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if split_regex is None:  # GPT-2 / SmolLM2: single digits, then GPT-2's own regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # Llama 3: its split regex, then bytes
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    return tok


def build_llama3_tokenizer(folder: pathlib.Path, vocab_size: int = 480) -> dict:
    """Llama 3 style tokenizer.json (BOS added by the post-processor) + chat template."""
    from tokenizers import processors
    tok = _train_bytelevel(LLAMA3_SPECIALS, LLAMA3_SPLIT, vocab_size)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
              "model_max_length": 512, "chat_template": LLAMA3_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "bos": bos,
            "eos": tok.token_to_id("<|eot_id|>"), "pad": None}


def build_smollm2_tokenizer(folder: pathlib.Path, vocab_size: int = 450) -> dict:
    """SmolLM2 style GPT-2 byte-level tokenizer.json (no BOS added) + ChatML template."""
    tok = _train_bytelevel(SMOLLM2_SPECIALS, None, vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|im_end|>", "clean_up_tokenization_spaces": False,
              "model_max_length": 512, "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos": tok.token_to_id("<|im_start|>"), "eos": tok.token_to_id("<|im_end|>"),
            "pad": tok.token_to_id("<|im_end|>")}


def build_chat_tokenizer(folder: pathlib.Path, specials: list[str], template: str, *,
                         eos: str, bos: Optional[str] = None, add_bos: bool = False,
                         vocab_size: int = 450) -> dict:
    """A byte-level BPE tokenizer.json with a family's special tokens (ids 0..n-1) and chat
    template; BOS added by the post-processor where the family does."""
    from tokenizers import processors
    tok = _train_bytelevel(specials, None, vocab_size)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": eos, "clean_up_tokenization_spaces": False,
              "model_max_length": 512, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos": None if bos is None else tok.token_to_id(bos), "eos": tok.token_to_id(eos),
            "pad": None}


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if "
    "message['role'] == 'assistant' else 'user') + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% else %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


def _qwen_tokenizer(folder):
    return build_chat_tokenizer(folder, QWEN_SPECIALS, CHATML_TEMPLATE, eos="<|im_end|>")


def _mistral_tokenizer(folder):
    return build_chat_tokenizer(folder, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                MISTRAL_TEMPLATE, eos="</s>", bos="<s>", add_bos=True)


def _gemma_tokenizer(folder):
    return build_chat_tokenizer(folder, GEMMA_SPECIALS, GEMMA_TEMPLATE, eos="<eos>", bos="<bos>",
                                add_bos=True)


TOKENIZER_BUILDERS = {
    "llama2": build_llama2_tokenizer, "llama3": build_llama3_tokenizer,
    "smollm2": build_smollm2_tokenizer, "qwen2": _qwen_tokenizer, "qwen3": _qwen_tokenizer,
    "mistral": _mistral_tokenizer, "mixtral": _mistral_tokenizer, "qwen3_moe": _qwen_tokenizer,
    "gemma2": _gemma_tokenizer, "gemma3": _gemma_tokenizer,
    "phi3": lambda folder: build_chat_tokenizer(
        folder, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|end|>"], PHI3_TEMPLATE, eos="<|endoftext|>", bos="<s>"),
}


# ----------------------------------------------------------------------------- models

def _randomize(model, seed: int, norm_centre: float = 1.0) -> None:
    """Redraws every weight (see the module docstring for why and how); biases ~ N(0, 0.5^2),
    norm weights ~ norm_centre + N(0, 0.1^2)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:  # RMSNorm weights
                p.copy_(norm_centre + 0.1 * noise)
            elif "embed_tokens" in name:  # tied: small, so the output is not the input token
                p.copy_(noise * (2 / math.sqrt(p.shape[1]) if tied else 0.5))
            else:  # nn.Linear weight [out, in] (experts stacked in front: [E, out, in])
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build_model(family: str, folder: pathlib.Path, special: dict, seed: int = 0):
    """Random float32 model of `family` (LlamaForCausalLM, or the family's own class), saved
    with safetensors into `folder`."""
    import torch
    import transformers
    config_class, shape = FAMILY_SHAPES.get(family, ("LlamaConfig", MODEL_SHAPES.get(family)))
    config = getattr(transformers, config_class)(
        vocab_size=special["vocab_size"], bos_token_id=special["bos"],
        eos_token_id=special["eos"], pad_token_id=special["pad"], **shape)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    _randomize(model, seed, 0.0 if family in ZERO_CENTRED_NORMS else 1.0)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"],
        do_sample=False)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def load_reference(folder: pathlib.Path):
    """transformers' float32 model from `folder` (eager attention: the plainest oracle)."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_logits(model, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """HF float32 logits [len, vocab] of each prompt (one unpadded forward per prompt)."""
    import torch
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
            out.append(logits.float().numpy())
    return out


def reference_greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """HF greedy continuations of each prompt (one unpadded `generate` per prompt), exactly
    max_new_tokens each with EOS treated as an ordinary token: the oracle for jinfer's
    `ignore_eos=True`, which neither stops at EOS nor bans it.

    HF has no such switch: `min_new_tokens` bans EOS (a different argmax wherever EOS is the
    top token) and an `eos_token_id=None` in the call's GenerationConfig is filled back in from
    the model's. So the model's own generation_config loses its EOS for the call.

    Returns (tokens, logprobs, margins), each a list per prompt of max_new_tokens values: the
    chosen ids, their log-probabilities under the raw logits, and the top-1 minus top-2 raw
    logit gap (how close greedy was to a tie).
    """
    import torch
    import transformers
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
        bos_token_id=None, output_logits=True, return_dict_in_generate=True)
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    tokens, logprobs, margins = [], [], []
    try:
        with torch.no_grad():
            for ids in prompts:
                out = model.generate(torch.tensor([list(ids)], dtype=torch.long),
                                     generation_config=config)
                new = out.sequences[0, len(ids):]                      # [steps]
                logits = torch.stack(out.logits)[:, 0].float()         # [steps, vocab]
                top2 = logits.topk(2, dim=-1).values                   # [steps, 2]
                chosen = torch.log_softmax(logits, -1).gather(-1, new[:, None])[:, 0]
                assert (new == logits.argmax(-1)).all(), "HF's greedy is not the raw argmax"
                assert len(new) == max_new_tokens, "HF stopped early"
                tokens.append(new.tolist())
                logprobs.append(chosen.tolist())
                margins.append((top2[:, 0] - top2[:, 1]).tolist())
    finally:
        model.generation_config.eos_token_id = saved_eos
    return tokens, logprobs, margins


# 70 and 150 run past llama3's original_max_position_embeddings (64).
DEFAULT_LENGTHS = (1, 5, 13, 70, 150)


def default_prompts(vocab_size: int, lengths: Sequence[int] = DEFAULT_LENGTHS,
                    seed: int = 0) -> list[list[int]]:
    """Random token-id prompts of the given lengths (special ids included on purpose)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


def make_fixture(family: str, folder, seed: int = 0,
                 prompts: Optional[Sequence[Sequence[int]]] = None,
                 lengths: Sequence[int] = DEFAULT_LENGTHS):
    """Writes the `family` model folder into `folder` (created) and returns
    (folder, hf_model, prompts, reference logits per prompt [len, vocab]); the prompts are
    `prompts` or random ids of the given `lengths`."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {ALL_FAMILIES}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = TOKENIZER_BUILDERS[family](folder)
    build_model(family, folder, special, seed)
    model = load_reference(folder)
    prompts = [list(p) for p in prompts] if prompts is not None else default_prompts(
        special["vocab_size"], lengths, seed)
    return folder, model, prompts, reference_logits(model, prompts)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="folder to write one subfolder per family")
    parser.add_argument("--families", nargs="+", default=list(ALL_FAMILIES),
                        choices=ALL_FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for family in args.families:
        folder, _, prompts, logits = make_fixture(family, args.out / family, args.seed)
        np.savez(folder / "reference_logits.npz",
                 **{f"prompt_{i}": np.asarray(p) for i, p in enumerate(prompts)},
                 **{f"logits_{i}": x for i, x in enumerate(logits)})
        logger.info("%s: wrote %s (%d prompts, reference logits in reference_logits.npz)",
                    family, folder, len(prompts))


if __name__ == "__main__":
    main()
