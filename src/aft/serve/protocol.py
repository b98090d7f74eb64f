"""The OpenAI chat-completions protocol: request validation and the JSON the server sends back.

A request body is validated whole before any work starts (the vLLM
entrypoints' rule): pydantic checks the JSON, the types, the roles and the
ranges; `ChatCall.check_caps` then checks what depends on the server (its caps
on n, K, L and max_tokens). Every failure is an `APIError`, answered as
OpenAI-style JSON `{"error": {"message", "type", "param", "code"}}`.

Fields besides the OpenAI ones (the `extra_body` of the openai SDK):

    top_k              vLLM's extension; -1 or 0 = off
    k                  P&A width K for this request (the served P&A model only)
    num_aggregation    P&A depth L for this request
    style              P&A prompt style ("aft" or "moa")
    return_trace       true: the response carries each answer's full trace
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..prompts import STYLES


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# --------------------------------------------------------------- request models
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    # "developer" is the newer OpenAI name of "system"; tool calls are not supported.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # other OpenAI fields are accepted and ignored

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    # vLLM's extensions that the openai engine sends with neutral values; only those are supported.
    repetition_penalty: float | None = None
    min_p: float | None = None
    # aft's extensions
    k: int | None = Field(None, ge=1)
    num_aggregation: int | None = Field(None, ge=0)
    style: Literal[STYLES] | None = None  # type: ignore[valid-type]
    return_trace: bool = False


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """The JSON body -> a validated request, or APIError(400) naming the first bad field."""
    try:
        req = ChatCompletionRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.repetition_penalty not in (None, 1.0):
        raise bad(f"repetition_penalty is not supported (only 1.0), got {req.repetition_penalty}", "repetition_penalty")
    if req.min_p not in (None, 0.0):
        raise bad(f"min_p is not supported (only 0), got {req.min_p}", "min_p")
    return req


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    if errors[0]["type"] == "json_invalid":
        return bad(f"the request body is not valid JSON: {errors[0]['msg']}")
    # Of a union's alternatives, the one that got furthest says the most (content parts, say).
    err = max(errors, key=lambda x: len(x["loc"]))
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list")))]
    where = ".".join(loc)
    got = "" if err["type"] == "missing" else f", got {err.get('input')!r}"[:120]
    message = f"{where}: {err['msg']}{got}" if where else f"the request body: {err['msg']}"
    return bad(message, loc[0] if loc else None)


# --------------------------------------------------------------- responses
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, texts: list[str], finish_reasons: list[str], usage_: dict,
               extra: dict | None = None) -> dict:
    """The chat.completion object of a non-streamed answer."""
    out = {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                        "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish_reasons))],
           "usage": usage_}
    if extra:
        out.update(extra)
    return out


def chunk(id: str, model: str, created: int, choices: list[dict], usage_: dict | None = None,
          include_usage: bool = False, extra: dict | None = None) -> dict:
    """One chat.completion.chunk; with include_usage every chunk has a `usage` key (null but in the last)."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage_
    if extra:
        out.update(extra)
    return out


def delta(index: int, content: str | None = None, role: str | None = None, finish_reason: str | None = None) -> dict:
    d = {}
    if role:
        d["role"] = role
    if content is not None:
        d["content"] = content
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
