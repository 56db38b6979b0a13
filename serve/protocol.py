"""The OpenAI-compatible wire format: request models, the error shape, and what the API
sends to a model replica (`GenerateRequest`) and gets back (`ReplicaEvent` dicts).

Request models are strict (no silent "5" → 5) and closed: an unknown or unsupported
field is a 400 naming it, not a silently ignored option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.errors import RayftError


class ApiError(RayftError):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.http_status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_from(exc: RayftError, *, param: str | None = None) -> ApiError:
    """The ApiError for any user-facing error (its class carries the status)."""
    if isinstance(exc, ApiError):
        return exc
    code = getattr(exc, "code", None) or _snake(type(exc).__name__)
    return ApiError(exc.http_status, str(exc), param=param, code=code)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the usage counts.")


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=256, description="Base model, adapter `name[@version]`, or merged model.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (limit: api.max_tokens_limit).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: Literal[1] = Field(1, description="Choices per request; only 1 is supported.")
    stream: bool = Field(False, description="Send server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = Field(None, description="include_usage: a final usage chunk when streaming.")
    stop: str | list[str] | None = Field(None, description="Up to api.max_stop_sequences strings that end the output.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Seed for sampling: same seed, same output.")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: only 0 is accepted.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: only 0 is accepted.")
    user: str | None = Field(None, max_length=256, description="End-user id (accepted, not used).")
    return_token_ids: bool = Field(False, description="Extension (as in vLLM): each choice also lists its token ids.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if any(not s or len(s) > 256 for s in items):
            raise ValueError("each stop string must be 1-256 characters")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one string).")
    echo: Literal[False] = Field(False, description="Not supported.")
    logprobs: None = Field(None, description="Not supported.")
    suffix: None = Field(None, description="Not supported.")
    best_of: Literal[1] | None = Field(None, description="Only 1.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"a list prompt must hold exactly one string (got {len(value)}); send one request per prompt")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=64, description="Accepted, not used.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: Literal[False] | None = Field(None, description="Not supported.")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming every bad field (first one as `param`)."""
    lines, first = [], None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "list[", "str", "int")))
        loc = loc or "<body>"
        first = first or loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown or unsupported field"
        line = f"{loc}: {msg}"
        if line not in lines:
            lines.append(line)
    return ApiError(400, "invalid request: " + "; ".join(lines[:10]), param=first, code="invalid_request")


# --------------------------------------------------------------------------- API → replica


class GenerateRequest(BaseModel):
    """What the API sends a model replica (already validated against the API limits)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model id the client asked for (for metrics and responses).")
    prompt: str | None = Field(None, description="Completion prompt (tokenized without special tokens, as in training).")
    messages: list[dict[str, str]] | None = Field(None, description="Chat messages (role, content), rendered by the chat template.")
    max_tokens: int = Field(ge=1, description="Tokens to generate at most (already within the API limit).")
    temperature: float = Field(ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(gt=0, le=1, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="Strings that end the output (not included in it).")
    seed: int | None = Field(None, description="Sampling seed; None draws one.")
    stream: bool = Field(False, description="Send every step (True) or the whole output at the end.")
