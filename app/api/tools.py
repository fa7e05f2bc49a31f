"""Tool calls for chat: a forced call (tool_choice 'required' or a named function) is a grammar.

As in vLLM, a forced call works for any model: the reply is generated under a JSON grammar (app/engine/
grammar.py) and turned into OpenAI `tool_calls`, so its arguments always parse and follow the function's
`parameters` schema (unless `max_tokens` cuts them short). The tools are also handed to the model's chat
template (`tools=`), which describes them to models trained on a tool format.

- a named function: the reply is that function's arguments object; finish_reason "stop", as OpenAI gives
  for a forced function. Streamed, the call opens with its id and name and the arguments follow as they
  are generated.
- 'required': the reply is a JSON array of `{"name": ..., "arguments": {...}}` (one call when
  `parallel_tool_calls` is false), each matching one tool; finish_reason "tool_calls". Streamed, the calls are sent
  once the array is complete.

'auto' (the model chooses between text and a call) needs a parser of each model family's own tool-call
format and is refused by the protocol layer, as vLLM does without a configured parser.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from app.engine.grammar import json_grammar
from app.protocol.openai import ChatCompletionRequest, ChatTool, FunctionCall, NamedToolChoice, ToolCall

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


@dataclass(frozen=True)
class ToolPlan:
    """How a forced tool call is generated and read back."""

    named: str | None  # the function of a named tool_choice; None for 'required'
    grammar: str

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan | None:
        if not body.forced_tools:
            return None
        tools = body.tools or []
        if isinstance(body.tool_choice, NamedToolChoice):
            name = body.tool_choice.function.name
            tool = next(t for t in tools if t.function.name == name)
            return cls(name, json_grammar(_parameters(tool)))
        call = {"anyOf": [{
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        } for t in tools]}
        array: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if body.parallel_tool_calls is False:
            array["maxItems"] = 1
        return cls(None, json_grammar(array))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.named is not None else "tool_calls"

    def calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls in a complete reply; None when it is not one (cut short by max_tokens)."""
        if self.named is not None:
            return [ToolCall(id=new_call_id(), function=FunctionCall(name=self.named, arguments=text))]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return [ToolCall(id=new_call_id(), function=FunctionCall(
            name=item["name"], arguments=json.dumps(item["arguments"], ensure_ascii=False)))
            for item in items]


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The request's tools as chat templates take them (transformers' `tools=`)."""
    if not body.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def template_message(role: str, text: str, msg: Any) -> dict[str, Any]:
    """One message as chat templates read it: tool calls with their arguments as objects (Llama 3.1's
    and most templates render `arguments | tojson`), tool answers with the id of the call they answer."""
    out: dict[str, Any] = {"role": role, "content": text}
    if msg.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}}
                             for c in msg.tool_calls]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
