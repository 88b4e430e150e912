"""OpenAI request bodies (pydantic) and their translation to `ftjax.SamplingParams`.

The limits live in the field declarations, so a bad value is a 400 whose message
names the field and the limit (FastAPI's validation error, reshaped by `app.py`).
Fields ftjax does not implement are refused by name (never silently ignored).
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ftjax.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered in OpenAI's shape `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extras)."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**32)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM's extras
    top_k: int = Field(0, ge=-1)                       # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(COMPLETION_MAX_TOKENS, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name": passed to the template as is
    role: str
    content: Optional[Union[str, List[TextPart]]] = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages through the template."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: List[int]


def sampling_params(req: _Sampling, logprobs: int, eos_ids=()) -> SamplingParams:
    """The request's options as SamplingParams (max tokens are passed separately).

    eos_ids: the model's eos ids; vLLM's stop_token_ids stop in addition to them.

    Raises:
      APIError: 400 for combinations the field limits cannot express.
    """
    bias = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            try:
                tok = int(key)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                               "logit_bias") from None
            if tok < 0 or abs(value) > MAX_LOGIT_BIAS:
                raise APIError(400, f"logit_bias[{key}] = {value}: ids must be >= 0 and "
                               f"biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                               "logit_bias")
            bias[tok] = value
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and not all(stop):
        raise APIError(400, "stop strings must be non-empty", "stop")
    try:
        return SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            min_new_tokens=req.min_tokens, seed=req.seed, n=req.n, logprobs=logprobs,
            stop_strings=stop or None, ignore_eos=req.ignore_eos, logit_bias=bias,
            stop_token_ids=_stop_ids(req.stop_token_ids, req.ignore_eos, eos_ids))
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _stop_ids(extra: Optional[List[int]], ignore_eos: bool, eos_ids):
    """None keeps SamplingParams' default (the model's eos ids, unless ignore_eos)."""
    if not extra:
        return None
    return tuple(dict.fromkeys(list(extra) + ([] if ignore_eos else list(eos_ids))))
