"""The OpenAI API as hetegen serves it: request bodies (pydantic), the error shape, and the
response documents (plain dicts, as OpenAI's clients read them).

Only batch-1 generation exists, so `n` must be 1; logprobs, tools and response formats are
refused with a 400 that names the parameter rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

#: at most this many stop strings (OpenAI's limit), each at most this many characters
MAX_STOPS, MAX_STOP_CHARS = 4, 256


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields every generation request shares. Unknown fields are ignored (clients send many);
    known ones are range-checked."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    stream: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    logprobs: StrictBool | StrictInt | None = None
    user: StrictStr | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logprobs", "tools", "echo", "suffix", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        """Fields of the OpenAI API hetegen does not implement (each request type has some)."""
        if value:
            verb = "are" if info.field_name in ("logprobs", "tools") else "is"
            raise ValueError(f"{info.field_name} {verb} not supported by hetegen")
        return value

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text; a list of parts may hold only text parts."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value and value.get("type") not in (None, "text"):
            raise ValueError("only the text response format is supported")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    stream_options: StreamOptions | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# --- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def document(rid: str, obj: str, model: str, choice: dict | None, **extra: Any) -> dict:
    """One response or stream chunk: `choice` (index 0, no logprobs) or no choices."""
    choices = [] if choice is None else [{"index": 0, **choice, "logprobs": None}]
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": choices, **extra}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict, timings: dict) -> dict:
    message = {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return document(rid, "chat.completion", model, message, usage=use, hetegen=timings)


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return document(rid, "chat.completion.chunk", model, {"delta": delta, "finish_reason": finish})


def completion_response(rid: str, model: str, text: str, finish: str, use: dict, timings: dict) -> dict:
    choice = {"text": text, "finish_reason": finish}
    return document(rid, "text_completion", model, choice, usage=use, hetegen=timings)


def completion_chunk(rid: str, model: str, text: str, finish: str | None = None) -> dict:
    return document(rid, "text_completion", model, {"text": text, "finish_reason": finish})


def usage_chunk(rid: str, model: str, obj: str, use: dict, timings: dict) -> dict:
    """The final chunk of a stream with `stream_options.include_usage`: no choices."""
    return document(rid, obj, model, None, usage=use, hetegen=timings)
