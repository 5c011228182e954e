"""The openai_compat routes' request and response models (pydantic), for ``/openapi.json``.

The request bodies are still checked by hand (``schema.py``): every refusal keeps OpenAI's error shape and wording
(``{"error": {"message", "type", "param", "code"}}``, naming the parameter), and the hot path pays no model
construction. These models describe the same rules — strict JSON types, ranges, enums, and, as model validators,
the rules that join two fields (``stream_options`` needs ``stream``, ``top_logprobs`` needs ``logprobs``, a
``tool_choice`` names one of the ``tools``, an assistant message has content or tool calls) — and
tests/test_openapi_plugins.py checks on generated bodies that the models and the hand parser accept the same ones.
Unknown top-level keys are allowed, as by the parser (clients send extras such as ``parallel_tool_calls``).

The response models describe what ``service.py`` returns, including this project's ``trajectory`` extension;
the answers themselves are serialized with orjson (long logprob lists), and the tests validate real answers
against these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from slime_router_core.admin import ErrorResponse  # the project's error shape: OpenAI's (400 names the param)

from .schema import MAX_N, MAX_STOP, MAX_TOP_LOGPROBS

REF_TEMPLATE = "#/components/schemas/{model}"

# What the parser accepts, per JSON type: no coercion ("1" is not a number, 1.0 not an integer, 0 not false).
_REQUEST = ConfigDict(strict=True, extra="allow")


def _false(v: bool) -> bool:
    if v:
        raise ValueError("not supported: must be false or absent")
    return v


FalseOnly = Annotated[bool, AfterValidator(_false), WithJsonSchema({"type": "boolean", "const": False})]
NonNegativeInt = Annotated[int, Field(ge=0)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]+$")]
Bias = Annotated[float, Field(ge=-100, le=100)]
LogitBias = Annotated[dict[TokenIdKey, Bias], WithJsonSchema({
    "type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    "description": "Token id (a decimal string) -> bias added to its logit, within [-100, 100]."})]


# --- request bodies ---------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = _REQUEST
    type: Literal["text", "input_text", "output_text"]
    text: str


class RefusalPart(BaseModel):
    model_config = _REQUEST
    type: Literal["refusal"]
    refusal: Any = None


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]
Content = Annotated[str | list[str | ContentPart],
                    Field(description="A string, or an array of text parts (other part types are refused).")]


class FunctionCallArguments(BaseModel):
    model_config = _REQUEST
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = Field(None, description="The arguments as a JSON text (or object).")


class MessageToolCall(BaseModel):
    """A tool call of an assistant message sent back in the history (ids are not checked)."""

    model_config = _REQUEST
    type: Literal["function"] = "function"
    function: FunctionCallArguments


class _Message(BaseModel):
    model_config = _REQUEST
    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[MessageToolCall] | None = None
    reasoning_content: str | None = Field(None, description="Reasoning the router returned with this turn.")

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(BaseModel):
    model_config = _REQUEST
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema.")


class Tool(BaseModel):
    model_config = _REQUEST
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _REQUEST
    name: str


class ToolChoiceFunction(BaseModel):
    model_config = _REQUEST
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool | None = None


class ResponseFormatText(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = _REQUEST
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = _REQUEST
    name: str
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the output follows.")


class ResponseFormatJsonSchema(BaseModel):
    model_config = _REQUEST
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class SamplingFields(BaseModel):
    """The fields ``/v1/chat/completions`` and ``/v1/completions`` share (``schema.validate_sampling``)."""

    model_config = _REQUEST
    model: str | None = Field(None, description="Echoed in the answer (default: the served model name).")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Annotated[int, Field(ge=1)] | Annotated[int, Field(ge=-1, le=-1)] | None = Field(
        None, description="A positive integer, or -1 for no limit.")
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over max_tokens when both are set.")
    min_tokens: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: LogitBias | None = None
    user: str | None = Field(None, description="Also the session key of cache-aware routing.")
    stream: bool | None = Field(None, description="Answer as server-sent events (text/event-stream).")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return self


class ToolFields(BaseModel):
    """``tools`` and ``tool_choice`` (``schema.validate_tools``)."""

    model_config = _REQUEST
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = Field(
        None, description="'auto' or 'required' need tools; a named function must be one of the tools.")

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> ToolFields:
        tc = self.tool_choice
        if isinstance(tc, str) and tc != "none" and not self.tools:
            raise ValueError("'tool_choice' is only allowed when 'tools' are specified")
        if isinstance(tc, ToolChoiceFunction) and tc.function.name not in [t.function.name for t in self.tools or []]:
            raise ValueError("'tool_choice' names a function that is not among the tools")
        return self


class ChatCompletionRequest(SamplingFields, ToolFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Passed to the chat template, e.g. "
                                                                          "{\"enable_thinking\": false}.")
    separate_reasoning: bool | None = Field(None, description="false: keep <think> blocks in content.")
    history_mode: Literal["template", "raw"] | None = Field(
        None, description="How assistant turns of the history are rendered (default: --openai-history).")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'logprobs' must be set to true when 'top_logprobs' is used")
        return self


Prompt = Annotated[
    str | Annotated[list[str], Field(min_length=1, max_length=1)]
    | Annotated[list[NonNegativeInt], Field(min_length=1)],
    Field(description="A string (or a list holding one string), or a non-empty array of token ids. Batches are not "
                      "supported.")]


class CompletionRequest(SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=5, description="How many top logprobs per token.")
    echo: FalseOnly | None = Field(None, description="Not supported.")
    suffix: None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, le=1)


class RetrieveFromMessagesRequest(ToolFields):
    """Body of ``POST /retrieve_from_messages``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    chat_template_kwargs: dict[str, Any] | None = None
    history_mode: Literal["template", "raw"] | None = None
    strict: bool | None = Field(None, description="404/410 instead of tokenizing unrecorded text afresh.")
    add_generation_prompt: bool | None = None
    return_text: bool | None = Field(None, description="Add the rendered conversation as 'text'.")


# --- answers ------------------------------------------------------------------------------------------


class Trajectory(BaseModel):
    """This project's extension (only with the trajectory cache): how the prompt's tokens were obtained."""

    cached_tokens: int = Field(description="Prompt tokens taken from recorded trajectories")
    fresh_tokens: int = Field(description="Prompt tokens tokenized now")
    recorded: bool = Field(description="Every choice was recorded for /retrieve_from_* (false: unfinished, "
                                       "or refused as larger than a quarter of the cache's bound)")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens the worker served from its prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionMetadata(BaseModel):
    weight_version: str = Field(description="The weight version that generated the answer")


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The model's exact JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(description="The <think> block (with the qwen3 reasoning parser)")
    tool_calls: list[ToolCall] | None = Field(None, description="Present when the model called tools")


class TopLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


FinishReason = Annotated[str, Field(description="stop, length, tool_calls or abort")]
MatchedStop = Annotated[int | str | None, Field(description="The stop string or token id that ended the choice")]


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason
    matched_stop: MatchedStop = None


class ChatCompletion(BaseModel):
    """Answer of ``POST /v1/chat/completions`` (without ``stream``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str
    metadata: CompletionMetadata
    trajectory: Trajectory | None


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason
    matched_stop: MatchedStop = None


class TextCompletion(BaseModel):
    """Answer of ``POST /v1/completions`` (without ``stream``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str
    metadata: CompletionMetadata
    trajectory: Trajectory | None


class ToolCallDelta(ToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None
    matched_stop: MatchedStop = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion. The last one before ``[DONE]`` has no choices and
    carries ``usage`` (with ``stream_options.include_usage``) or, when a choice was not recorded,
    ``trajectory``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    trajectory: Trajectory | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: FinishReason | None
    matched_stop: MatchedStop = None


class CompletionChunk(BaseModel):
    """One ``data:`` event of a streamed completion (same rules as chat chunks)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    trajectory: Trajectory | None = None


class ServedModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(description="The --hf-checkpoint")


class ServedModelList(BaseModel):
    """Answer of ``GET /v1/models``: the served model."""

    object: Literal["list"]
    data: list[ServedModel]


class RewrittenTurn(BaseModel):
    message_index: int
    cause: str = Field(description="template_rule, client_edit or router_normalisation")
    reason: str
    generated_tokens: int
    diverges_at_char: int | None
    generated: str | None = Field(description="80 characters of what was generated from the divergence on")
    rendered: str | None = Field(description="80 characters of what is rendered there now")


class TokenRetrieval(BaseModel):
    """The trajectory cache's answer for a text: one entry per token in each list."""

    model_config = ConfigDict(extra="allow")
    tokens: list[int]
    response: str
    loss_mask: list[int] = Field(description="1 for generated tokens, 0 for prompt and freshly tokenized ones")
    rollout_logp: list[float]
    token_length: int
    loss_mask_length: int
    weight_versions: list[str | None]
    exact_tokens: int
    fresh_tokens: int
    generated_tokens: int
    recorded_chars: int
    worker_url: str | None
    evicted: bool
    evicted_at_char: int | None = None
    evicted_generated_tokens: int | None = None
    warning: str | None = None


class Segment(TokenRetrieval):
    message_indices: list[int] = Field(description="The messages whose trajectory this is")


class MessagesRetrieval(TokenRetrieval):
    """Answer of ``POST /retrieve_from_messages`` (see openai_compat/README.md)."""

    history_mode: Literal["template", "raw"]
    history_rewritten: bool
    mismatch: str | None = Field(description="The first rewritten turn's cause")
    rewritten_turns: list[RewrittenTurn]
    unverified_turns: list[int] = Field(description="Assistant messages the router did not produce (or forgot)")
    segments: list[Segment] | None = Field(None, description="Each rewritten turn's own exact trajectory")
    text: str | None = Field(None, description="The rendered conversation (with return_text)")


class OpenAIStats(BaseModel):
    """Answer of ``GET /openai_compat/stats``; also ``rewritten_turns_<cause>`` and
    ``audit_generated_tokens_<cause>`` per cause."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, int]
    chat_requests: int
    completion_requests: int
    streams: int
    client_disconnects: int
    recorded: int
    not_recorded_incomplete: int
    not_recorded_too_large: int
    record_errors: int
    retrievals: int
    history_rewritten: int
    rewritten_turns: int
    unverified_turns: int
    spliced_turns: int
    audit_generated_tokens_exact: int
    history_entries: int
    history_mode: Literal["template", "raw"]
    model: str


# --- OpenAPI ------------------------------------------------------------------------------------------


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a JSON body checked by hand (add the model with ``add_schemas``)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}}}}}


def streamed_answer(model: type[BaseModel], chunk: type[BaseModel], description: str) -> dict[str, Any]:
    """The 200 response of a route answering ``model`` as JSON, or with ``"stream": true`` server-sent events:
    ``data: <chunk JSON>`` events, then ``data: [DONE]``; an upstream failure mid-stream is an ``{"error": ...}``
    event before ``[DONE]`` (``itemSchema``: one event, as FastAPI describes its own SSE routes)."""
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [{"$ref": REF_TEMPLATE.format(model=chunk.__name__)},
                                        {"$ref": REF_TEMPLATE.format(model=ErrorResponse.__name__)}]}}
    return {"model": model, "description": description, "content": {
        "application/json": {},  # the model's schema (FastAPI fills it in)
        "text/event-stream": {
            "schema": {"type": "string", "description": "Server-sent events: `data: <JSON>` per chunk, then "
                                                        "`data: [DONE]`."},
            "itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}}


def add_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put ``models`` (and the models they use) in the app's ``components.schemas``: the bodies of routes that
    parse their JSON by hand are described by reference there (FastAPI only adds the models a route declares
    as a parameter or a response). Chains onto any earlier ``app.openapi``."""
    previous = app.openapi
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def openapi() -> dict[str, Any]:
        doc = previous()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in schemas.items():
            components.setdefault(name, schema)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
