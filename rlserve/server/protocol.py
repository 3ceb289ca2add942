"""Request and response models: OpenAI's shapes for /v1/*, SGLang-like shapes for the native routes.

Bounds live here so a request that validates can always be served: nothing reaching the engine
can make it fail for reasons other than the prompt itself.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_N = 64
MAX_LOGPROBS = 20
MAX_TOKENS = 1 << 30
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
# In a prompt, token ids are strict ints so that ["12", "34"] stays two texts, and the token-id branches
# come first, tried left to right: a smart-mode union validates a 2,000-token prompt against every
# branch (~0.35 ms a request on the front end's one thread; ~0.07 ms this way).
# No bounds here: an out-of-range id (negative, or past the vocabulary) fails the prompt check, whose
# message names the id; a bound here would fail every branch of the union with a misleading message.
PromptTokenId = StrictInt
PromptIds = Annotated[list[PromptTokenId] | list[list[PromptTokenId]], Field(union_mode="left_to_right")]
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1 - MAX_N)]
StopStrings = str | Annotated[list[str], Field(max_length=64)] | None


class _Model(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


# ---- errors ----
class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# ---- shared sampling fields (OpenAI names plus the usual vLLM/SGLang extensions) ----
class _Sampling(_Model):
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=1e6)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=1 << 31)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=1e6)
    seed: Seed | None = None
    stop: StopStrings = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    # OpenAI's map of token id (a string in JSON) to a bias in [-100, 100] added to its logit.
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None


class _OpenAIRequest(_Sampling):
    """A /v1 body: the fields of another server that rlserve takes too, and unknown ones kept so that
    they can be logged (extra="allow") instead of being dropped without a word."""
    model_config = ConfigDict(allow_inf_nan=False, extra="allow")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    regex: str | None = None       # SGLang's structured-output extensions, as in its /v1 bodies
    ebnf: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---- /v1/completions ----
Prompt = Annotated[list[PromptTokenId] | list[list[PromptTokenId]] | str | list[str],
                   Field(union_mode="left_to_right")]


class CompletionRequest(_OpenAIRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class CompletionLogprobs(_Model):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- /v1/chat/completions ----
class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None     # an assistant turn that called tools
    tool_call_id: str | None = None                     # a tool result answers this call


class JsonSchemaFormat(_Model):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Model):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# ---- /v1/models ----
class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- native routes ----
class NativeSamplingParams(_Model):
    max_new_tokens: int | None = Field(128, ge=1, le=MAX_TOKENS)
    min_new_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0, le=1e6)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, lt=1 << 31)
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=1e6)
    seed: Seed | None = None
    sampling_seed: Seed | None = None    # SGLang's name for seed (what sglang-router forwards); seed wins
    stop: StopStrings = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    # rlserve's own: "tempered" reports logprobs of the distribution sampled from (after temperature), as RL wants
    logprobs_mode: Literal["raw", "tempered"] = "raw"


class GenerateRequest(_Model):
    text: str | list[str] | None = None
    input_ids: PromptIds | None = None
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class TokenizeResponse(_Model):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[TokenId]
    skip_special_tokens: bool = False


class DetokenizeResponse(_Model):
    text: str


class AbortRequest(_Model):
    rid: str | None = None
    abort_all: bool = False


_OpenAIRequest.model_rebuild()      # its response_format type is defined further down
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
