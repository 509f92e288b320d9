"""OpenAI's wire format as nanoseek serves it: the request bodies (unknown fields ignored, as
OpenAI does) and the tool-call conversations OpenAI refuses, the error JSON, and the split of a
completion into DeepSeek's `reasoning_content` (the leading `<think>...</think>`) and `content`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nanoseek.tools import TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------
# request bodies (unknown fields are ignored)

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str  # required, as OpenAI requires it: a call without one can never be answered
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(SamplingRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


def check_tool_replies(messages: list[Message]) -> None:
    """Refuses, as OpenAI does, a tool message that answers no call of the assistant message it
    follows, and an assistant message whose calls are not all answered by the tool messages
    right after it (before the next message of another role, or the end)."""
    calls: dict[str, bool] = {}  # the calls of the assistant message the tool messages follow: answered yet?
    caller = 0
    for i, m in enumerate(messages):
        if m.role != "tool":
            _check_answered(calls, caller)
            calls = {c.id: False for c in m.tool_calls or []} if m.role == "assistant" else {}
            caller = i
        elif m.tool_call_id is None:
            raise APIError(400, f"messages[{i}] is a tool message without a tool_call_id; set it to the id of "
                                "the tool call it answers", param=f"messages.{i}.tool_call_id")
        elif m.tool_call_id not in calls:
            raise APIError(400, f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no tool call of the "
                                "assistant message it follows", param=f"messages.{i}.tool_call_id")
        else:
            calls[m.tool_call_id] = True
    _check_answered(calls, caller)


def _check_answered(calls: dict[str, bool], caller: int) -> None:
    unanswered = ", ".join(repr(k) for k, answered in calls.items() if not answered)
    if unanswered:
        raise APIError(400, f"messages[{caller}] has tool_calls, so a tool message must answer each right "
                            f"after it; none answers {unanswered}", param=f"messages.{caller}.tool_calls")


# ---------------------------------------------------------------------------------------
# the reasoning / answer split

class ReasoningSplitter:
    """Feeds streamed text; returns (reasoning delta, content delta). Text inside a leading
    <think>...</think> is reasoning; the newlines right after </think> are dropped."""

    def __init__(self):
        self.state = "start"
        self.pending = ""
        self.saw_think = False

    def feed(self, chunk: str) -> tuple[str, str]:
        reasoning = content = ""
        chunk = self.pending + chunk
        self.pending = ""
        while chunk:
            if self.state == "start":
                stripped = chunk.lstrip()
                if not stripped:
                    self.pending = chunk
                    break
                if stripped.startswith("<think>"):
                    self.state, chunk = "reasoning", stripped[len("<think>"):]
                    self.saw_think = True
                elif "<think>".startswith(stripped):
                    self.pending = chunk
                    break
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                at = chunk.find("</think>")
                if at < 0:  # keep back what may be the start of a split </think>
                    keep = next((k for k in range(min(len(chunk), 7), 0, -1) if "</think>".startswith(chunk[-k:])), 0)
                    reasoning += chunk[: len(chunk) - keep]
                    self.pending = chunk[len(chunk) - keep:]
                    break
                reasoning += chunk[:at]
                self.state, chunk = "after", chunk[at + len("</think>"):]
            elif self.state == "after":
                chunk = chunk.lstrip("\n")
                if chunk:
                    self.state = "content"
            else:
                content += chunk
                break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            return rest, ""
        return ("", rest) if self.state in ("start", "content") else ("", "")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None if the text has no <think> block, answer)."""
    s = ReasoningSplitter()
    r, c = s.feed(text)
    r2, c2 = s.flush()
    return (r + r2 if s.saw_think else None), c + c2


# ---------------------------------------------------------------------------------------
# tool calls: a built-in call stays in the text, a call to the client's functions ends it

class ToolCallSplitter:
    """Feeds streamed text; returns the text that is safe to show. A call block
    (`<｜tool▁calls▁begin｜>` ... `<｜tool▁calls▁end｜>`) is held back until it is known whose it
    is: followed by a tool's output it was a built-in call and goes out as text; at the end of a
    response whose finish_reason is "tool_calls" it was the client's, and `finish` drops it
    (the calls go out as `tool_calls`)."""

    def __init__(self):
        self.held = ""

    def feed(self, chunk: str) -> str:
        text = self.held + chunk
        start = _unanswered_block(text)
        if start < 0:
            self.held = ""
            return text
        closed = text.find(TOOL_CALLS_END, start)
        if closed >= 0 and TOOL_OUTPUT_BEGIN in text[closed:]:
            self.held = ""
            return text
        self.held = text[start:]
        return text[:start]

    def finish(self, reason: str | None) -> str:
        """The held text at the end: none if the response ended in a client's call."""
        held, self.held = self.held, ""
        return "" if reason == "tool_calls" else held


def split_tool_calls(text: str, finish_reason: str | None) -> str:
    """The text of a finished response without the client's call block that ended it."""
    start = _unanswered_block(text)
    return text[:start] if finish_reason == "tool_calls" and start >= 0 else text


def _unanswered_block(text: str) -> int:
    """Where the call block that no tool's output has answered yet begins (-1: none): the first
    `<｜tool▁calls▁begin｜>` after the last output, so that a block the model left unclosed goes
    with the call that ends the response, not into its text."""
    return text.find(TOOL_CALLS_BEGIN, max(0, text.rfind(TOOL_OUTPUT_END)))
