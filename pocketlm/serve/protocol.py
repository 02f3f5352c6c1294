"""The OpenAI wire format: request bodies (validated) and the error shape every failure answers in."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from pydantic_core import PydanticCustomError

# Unknown fields are ignored, as OpenAI-compatible servers do: clients send options they don't need.
Lenient = ConfigDict(extra="ignore")


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ContentPart(BaseModel):
    model_config = Lenient
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class CalledFunction(BaseModel):
    model_config = Lenient
    name: FunctionName
    arguments: str = "{}"  # JSON text, as the model wrote it


class MessageToolCall(BaseModel):
    """A call an assistant made earlier in the conversation."""
    model_config = Lenient
    id: str = Field(default="", max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = Lenient
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=64)  # an assistant's calls
    tool_call_id: str | None = Field(default=None, max_length=128)  # a tool's result: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates take it (developer is system)."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionSpec(BaseModel):
    model_config = Lenient
    name: FunctionName
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict | None = None  # a JSON Schema of the arguments (an object); none: no arguments
    strict: bool | None = None  # always enforced here


class ToolSpec(BaseModel):
    model_config = Lenient
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = Lenient
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = Lenient
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: FunctionName
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # always enforced here


class ResponseFormat(BaseModel):
    model_config = Lenient
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = Lenient
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completions requests share."""
    model_config = Lenient
    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's, but llama.cpp's and vLLM's servers take it
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer: folded into the generator's range
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    # OpenAI's: a token id (as a string key) -> a bias added to its logit before sampling
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^-?[0-9]{1,12}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(default=None, max_length=1024)
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False  # not OpenAI's (vLLM's): generate max_tokens even past end-of-sequence

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return [s for s in stops if s]

    def bias(self) -> dict[int, float] | None:
        """logit_bias with integer token ids (checked against the vocabulary when the job is submitted)."""
        return {int(k): v for k, v in self.logit_bias.items() if v} if self.logit_bias else None


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    # text, texts, token ids or lists of token ids; each prompt needs at least one token
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text, or token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        return list(value)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)  # a response id
    rating: Literal["up", "down", 1, -1]
    comment: str | None = Field(default=None, max_length=4000)

    def score(self) -> int:
        return 1 if self.rating in ("up", 1) else -1


class ArenaVoteRequest(BaseModel):
    """The arena's verdict on two answers to one prompt (both response ids from this server)."""
    model_config = ConfigDict(extra="forbid")
    left: str = Field(min_length=1, max_length=64)
    right: str = Field(min_length=1, max_length=64)
    winner: Literal["left", "right", "tie", "bad"]  # tie: both good; bad: both bad


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one request


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. `input` is checked by `texts` (one clear line for each way it can be
    wrong); token ids are refused there: they would be ids of the client's vocabulary, not the embedder's."""
    model_config = Lenient
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, as OpenAI sends it
    dimensions: int | None = Field(default=None, ge=1)  # must be the model's own (vectors are not shortened)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input", mode="wrap")
    @classmethod
    def _input(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # one line, not one per member of the union
            raise PydanticCustomError("input_type", "should be a string or a list of strings") from None

    def texts(self) -> list[str]:
        value = [self.input] if isinstance(self.input, str) else self.input
        if not value:
            raise APIError(400, "input is an empty list; give a string or a list of strings", param="input")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"input has {len(value)} items; at most {MAX_EMBEDDING_INPUTS} per request",
                           param="input")
        if not all(isinstance(v, str) for v in value):
            raise APIError(400, "input as token ids is not supported (they would be another tokenizer's ids); "
                                "send the text", param="input")
        empty = next((i for i, v in enumerate(value) if not v), None)
        if empty is not None:
            raise APIError(400, "input is an empty string" if isinstance(self.input, str)
                           else f"input[{empty}] is an empty string", param="input")
        return list(value)


# ---------------------------------------------------------------------------------------------
# responses, as the OpenAPI schema documents them (the routes build their JSON directly; the fuzzing
# tests check every answer against these)
# ---------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Answer(BaseModel):
    """What chat and completion responses share; `variant` and `experiment` are pocketlm's (which variant
    answered, in which experiment)."""
    id: str
    created: int
    model: str
    usage: Usage
    variant: str
    experiment: str | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ResponseFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    cited: list[int] | None = None  # from a variant with an index: the `sources` numbers this answer cites


class Source(BaseModel):
    """A passage a variant with an index put before the question: [number] in the prompt, what answers cite."""
    number: int
    chunk: int  # its id in the index
    doc_id: str
    source: str  # the file it came from
    title: str
    start: int  # character offsets in the document
    end: int
    text: str
    score: float  # the retriever's (for hybrid, the reciprocal-rank-fusion score)


class ChatCompletion(Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    sources: list[Source] | None = None  # only from a variant with an index


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"]


class Completion(Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = None
    variants: list[str] | None = None  # for an experiment's name: the variants it splits between
    index: str | None = None  # a variant that answers from this index
    task: Literal["embedding"] | None = None  # an embedding model (for /v1/embeddings)
    dimensions: int | None = None  # an embedding model's


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    experiment: str | None = None
    queue_depth: int
    active_sequences: int


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"]
    response_id: str
    variant: str
    experiment: str | None = None
    rating: Literal["up", "down"]


class ArenaVoteResponse(BaseModel):
    id: int
    object: Literal["arena.vote"]
    left_variant: str
    right_variant: str
    winner: Literal["left", "right", "tie", "bad"]


ERROR_RESPONSES = {
    "4XX": {"model": ErrorResponse, "description": "the request was refused: its `error` says why and what to do"},
    "5XX": {"model": ErrorResponse, "description": "the server failed this request (logged with its id)"},
}


def _event_stream(chunk_object: str, choice: dict, more: dict | None = None) -> dict:
    """An SSE response as OpenAPI documents one (`schema` describes each event): `data` is a JSON chunk
    with `object` = chunk_object and choices shaped as `choice` (and `more` properties), or an error
    object, and `[DONE]` last."""
    text = {"type": "string"}
    number = {"type": "integer"}
    chunk = {"type": "object", "required": ["id", "object", "created", "model", "choices"],
             "properties": {"id": text, "object": {"const": chunk_object}, "created": number, "model": text,
                            "choices": {"type": "array", "items": choice},
                            "usage": {"anyOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]},
                            **(more or {})}}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": {"anyOf": [chunk, {"$ref": "#/components/schemas/ErrorResponse"}]}}]}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}


FINISH = {"enum": ["stop", "length", None]}
_CALL_DELTA = {"type": "object", "required": ["index"], "properties": {
    "index": {"type": "integer"}, "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
CHAT_STREAM = _event_stream("chat.completion.chunk", {
    "type": "object", "required": ["index", "delta", "finish_reason"],
    "properties": {"index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length", "tool_calls", None]},
                   "delta": {"type": "object", "properties": {
                       "role": {"const": "assistant"}, "content": {"type": "string"},
                       "tool_calls": {"type": "array", "items": _CALL_DELTA}}},
                   # a variant with an index: the numbers of `sources` the answer cites, with its finish_reason
                   "cited": {"type": "array", "items": {"type": "integer"}}}},
    # a variant with an index: the passages the answer was given, in the first chunk
    {"sources": {"type": "array", "items": {"$ref": "#/components/schemas/Source"}}})
COMPLETION_STREAM = _event_stream("text_completion", {
    "type": "object", "required": ["index", "text", "finish_reason"],
    "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": FINISH}})


def documented(model: type[BaseModel] | None = None, content: dict | None = None) -> dict:
    """The `responses` of a route for the OpenAPI schema: its 200 body (JSON `model`, and other `content`
    such as an event stream) and OpenAI's error object for every 4xx and 5xx."""
    ok: dict = {"description": "success"}
    if model is not None:
        ok["model"] = model
    if content:
        ok["content"] = content
    return {200: ok, **ERROR_RESPONSES}
