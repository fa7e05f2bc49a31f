"""Tool calls for chat, enforced by grammars (app/engine/grammar.py) so that any model's calls parse.

The tools are handed to the model's chat template (`tools=`), which describes them to models trained on a
tool format, and the reply is generated under a grammar chosen by `tool_choice`:

- a named function: the reply is that function's arguments object (JSON following its `parameters`);
  finish_reason "stop", as OpenAI gives for a forced function. Streamed, the call opens with its id and
  name and the arguments follow as they are generated.
- 'required': the reply is a JSON array of `{"name": ..., "arguments": {...}}` (one call when
  `parallel_tool_calls` is false), each matching one tool; finish_reason "tool_calls".
- 'auto' (the default with tools): either text, or, when the reply starts with `{`, one call in the JSON
  form Llama 3.1+ models are trained to emit, `{"name": ..., "parameters": {...}}`, held to the tool's
  schema; finish_reason "tool_calls" for a call. A text reply cannot start with `{`: that first character
  is how a call is told from text, so a call is never returned as broken text and text never misparsed.

A reply cut short by `max_tokens` in 'required' or 'auto' call form comes back as its text with
finish_reason "length"; a named call's arguments come back cut short, as OpenAI returns them. Streamed,
'required' and 'auto' calls are sent whole once complete; 'auto' text streams as usual.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from app.engine.grammar import GrammarError, json_grammar, json_options, lark_grammar
from app.protocol.openai import ChatCompletionRequest, ChatTool, FunctionCall, NamedToolChoice, ToolCall

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # their values are data, not schemas


def _mounted(schema: dict[str, Any], at: str, tag: str, defs: dict[str, Any]) -> dict[str, Any]:
    """`schema` placed at JSON pointer `at` of a bigger document: its `$defs`/`definitions` move to the
    document's `$defs` under names prefixed with `tag`, and its local JSON-pointer `$ref`s are rewritten to
    match (Pydantic-made tool schemas, the OpenAI SDK's and LangChain's, put every nested model in `$defs`).
    A schema with its own `$id` resolves its refs against itself and is left as it is."""
    if "$id" in schema:
        return schema
    schema = copy.deepcopy(schema)
    moved = {key: schema.pop(key) for key in ("$defs", "definitions") if isinstance(schema.get(key), dict)}

    def rewrite(ref: str) -> str:
        if ref != "#" and not ref.startswith("#/"):
            return ref  # an anchor or another document: not a pointer into this schema
        pointer = ref[1:]
        for key in moved:
            if pointer.startswith(f"/{key}/"):
                return f"#/$defs/{tag}{key.lstrip('$')}_{pointer[len(key) + 2:]}"
        return f"#{at}{pointer}"

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                node["$ref"] = rewrite(node["$ref"])
            for key, value in node.items():
                if key not in _DATA_KEYWORDS:
                    fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    fix(schema)
    for key, group in moved.items():
        for name, sub in group.items():
            fix(sub)
            defs[f"{tag}{key.lstrip('$')}_{name}"] = sub
    return schema


def _call_schema(tools: list[ChatTool], arguments_key: str, at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One call to any of `tools`, as a schema placed at JSON pointer `at` of its document, and the `$defs`
    that document's root must carry."""
    defs: dict[str, Any] = {}
    calls = [{
        "type": "object",
        "properties": {"name": {"const": t.function.name},
                       arguments_key: _mounted(_parameters(t), f"{at}/anyOf/{i}/properties/{arguments_key}",
                                               f"tool{i}_", defs)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    } for i, t in enumerate(tools)]
    return {"anyOf": calls}, defs


def _auto_grammar(tools: list[ChatTool]) -> str:
    """Text that does not start with `{`, or one Llama-style call (Lark with llguidance's %json)."""
    call, defs = _call_schema(tools, "parameters", "")
    schema = json.dumps(json_options({**call, **({"$defs": defs} if defs else {})}))
    return lark_grammar(f"start: call | text\ncall: %json {schema}\ntext: /[^{{][\\s\\S]*/\n")


@dataclass(frozen=True)
class ToolPlan:
    """How a reply that may call tools is generated and read back."""

    mode: Literal["auto", "required", "named"]
    grammar: str
    named: str | None = None  # the function of a named tool_choice

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolPlan | None:
        """None when the reply is plain text (no tools, or tool_choice 'none'); GrammarError for a
        `parameters` schema that cannot be enforced."""
        try:
            return cls._of(body)
        except GrammarError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:  # a malformed schema
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from None

    @classmethod
    def _of(cls, body: ChatCompletionRequest) -> ToolPlan | None:
        mode, tools = body.tool_mode, body.tools or []
        if mode is None:
            return None
        if mode == "named":
            assert isinstance(body.tool_choice, NamedToolChoice)
            name = body.tool_choice.function.name
            tool = next(t for t in tools if t.function.name == name)
            return cls(mode, json_grammar(_parameters(tool)), name)
        if mode == "auto":
            return cls(mode, _auto_grammar(tools))
        call, defs = _call_schema(tools, "arguments", "/items")
        array: dict[str, Any] = {"type": "array", "items": call, "minItems": 1, **({"$defs": defs} if defs else {})}
        if body.parallel_tool_calls is False:
            array["maxItems"] = 1
        return cls(mode, json_grammar(array))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.mode == "named" else "tool_calls"

    def is_call(self, text: str) -> bool:
        """Whether a reply that begins with `text` (non-empty) is a call rather than text."""
        return self.mode != "auto" or text.startswith("{")

    def calls(self, text: str) -> list[ToolCall] | None:
        """The tool calls in a finished reply; None when it is text (auto) or not a complete call."""
        if self.mode == "named":
            return [_call(self.named, text)]
        if not self.is_call(text):
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        if self.mode == "auto":
            return [_call(doc["name"], json.dumps(doc["parameters"], ensure_ascii=False))]
        return [_call(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in doc]


def _call(name: str | None, arguments: str) -> ToolCall:
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name or "", arguments=arguments))


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
                              "function": {"name": c.function.name,
                                           "arguments": _loads_or_text(c.function.arguments)}}
                             for c in msg.tool_calls]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
