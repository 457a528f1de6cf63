"""ember: an LLM engine builder and OpenAI-compatible inference server."""

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name):  # torch is imported only when the engine is asked for
    if name == "LLM":
        from ember.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from ember.engine.async_engine import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
