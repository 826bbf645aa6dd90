"""tokenmill: an LLM inference and serving engine in Python on PyTorch."""

from tokenmill.errors import ModelLoadError, RequestError, TokenizerError, TokenmillError
from tokenmill.llm import LLM
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TokenmillError", "ModelLoadError",
           "RequestError", "TokenizerError"]
__version__ = "0.1.0"
