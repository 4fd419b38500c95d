"""jinfer: an LLM inference engine on JAX with a paged KV cache.

    from jinfer import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    print(llm.generate("Why is the sky blue?", SamplingParams(max_tokens=64))[0].outputs[0].text)
"""

from importlib.metadata import PackageNotFoundError, version as _version

from jinfer.api.async_llm import AsyncLLM
from jinfer.api.beam_search import BeamSearchOutput, BeamSearchParams
from jinfer.api.llm import LLM
from jinfer.api.outputs import CompletionOutput, Logprob, RequestOutput
from jinfer.api.sampling_params import SamplingParams

try:
    __version__ = _version("jinfer")
except PackageNotFoundError:  # run from a source tree without installing (PYTHONPATH=.)
    __version__ = "0.1.0+source"

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "BeamSearchParams", "BeamSearchOutput"]
