"""Records what gonka's vLLM fork makes of MiniMax-M2 answers under governance's arguments
(`--enable-auto-tool-choice --tool-call-parser minimax_m2 --reasoning-parser
minimax_m2_append_think`), for the native engine's answer parsers to be tested against
(`minimax_m2_parsers.json`, read by `node-daemon/src/inference/answer_parsing`).

It runs the fork's own parser code: its MiniMax-M2 tool-call parser, its append-think reasoning
parser, its schema coercion (`tool_parsers/utils.py`) and its `DelegatingParser` (which joins
them, whole and streamed), loaded from a checkout of the fork into vLLM's CPU build (the
`scripts/vllm-env.sh` venv), whose classes stand in for the fork's protocol types. The serving
layer's decisions around the parser (when tools are parsed at all, `finish_reason`, which
streamed deltas are sent) are restated from the fork's `chat_completion/serving.py` in
`whole()` and `stream()` below.

    python minimax_m2_parsers.py FORK_TREE COMMIT > minimax_m2_parsers.json

FORK_TREE: the fork's `vllm/` at COMMIT, of github.com/kaitakuai/vllm's branch
poc-sampler-residual-v0.23 (gonka-ai/vllm's PoC fork on vLLM 0.23; mlnode 3.0.16 runs the fork
on vLLM 0.25.1), e.g. `git archive COMMIT vllm/tool_parsers vllm/reasoning vllm/parser | tar -x`.
"""

import json
import sys
import types
from pathlib import Path

import vllm.entrypoints.generate.base.protocol as base_protocol
import vllm.tool_parsers.streaming as tool_streaming
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

FORK = Path(sys.argv[1])

# The special tokens' ids in this made-up vocabulary (MiniMax-M2's own are 200000-odd); every
# other piece of text is token 7, the end of sequence 2.
VOCAB = {"<think>": 900, "</think>": 901, "<minimax:tool_call>": 902, "</minimax:tool_call>": 903}
TEXT, EOS = 7, 2


class Tokenizer:
    def get_vocab(self):
        return dict(VOCAB)


def load(name, relative):
    """The fork's file `relative`, as module `name`."""
    module = types.ModuleType(name)
    module.__file__ = str(FORK / relative)
    sys.modules[name] = module
    exec(compile((FORK / relative).read_text(), module.__file__, "exec"), module.__dict__)
    return module


# The fork's module names for what vLLM 0.32 keeps elsewhere.
engine_protocol = types.ModuleType("vllm.entrypoints.openai.engine.protocol")
engine_protocol.__dict__.update(base_protocol.__dict__)


class DeltaMessage(base_protocol.OpenAIBaseModel):
    """The fork's: vLLM 0.32's drops an empty `tool_calls` when it writes one, the fork's not."""

    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[base_protocol.DeltaToolCall] = base_protocol.Field(default_factory=list)


engine_protocol.DeltaMessage = DeltaMessage
sys.modules["vllm.entrypoints.openai.engine"] = types.ModuleType("vllm.entrypoints.openai.engine")
sys.modules["vllm.entrypoints.openai.engine.protocol"] = engine_protocol
chat_utils = types.ModuleType("vllm.entrypoints.chat_utils")
chat_utils.make_tool_call_id = tool_streaming.make_tool_call_id
sys.modules["vllm.entrypoints.chat_utils"] = chat_utils

# The fork's coercion of parameter values to the tools' JSON-schema types.
import vllm.tool_parsers.utils as utils  # noqa: E402

fork_utils = load("fork_tool_parser_utils", "vllm/tool_parsers/utils.py")
for name in ("find_tool_properties", "extract_types_from_schema", "coerce_to_schema_type"):
    setattr(utils, name, getattr(fork_utils, name))

tool_parser_module = load("fork_minimax_m2_tool_parser", "vllm/tool_parsers/minimax_m2_tool_parser.py")
reasoning_module = load("fork_minimax_m2_reasoning_parser", "vllm/reasoning/minimax_m2_reasoning_parser.py")
abstract_parser = load("fork_abstract_parser", "vllm/parser/abstract_parser.py")


class Parser(abstract_parser.DelegatingParser):
    reasoning_parser_cls = reasoning_module.MiniMaxM2AppendThinkReasoningParser
    tool_parser_cls = tool_parser_module.MinimaxM2ToolParser


def request(case):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        if key in case:
            body[key] = case[key]
    return ChatCompletionRequest.model_validate(body)


def calls(tool_calls, req):
    out = [{"name": c.name, "arguments": c.arguments} for c in tool_calls]
    return out if req.parallel_tool_calls else out[:1]


def whole(case):
    """`chat_completion_full_generator` for one choice: the message and the finish reason."""
    req = request(case)
    text = "".join(piece for _, piece in case["deltas"])
    reasoning, content, tool_calls = Parser(Tokenizer(), req.tools).parse(text, req, enable_auto_tools=True)
    if not req.include_reasoning:
        reasoning = None
    # A null or "none" choice gets the content alone; "auto" with tools gets the calls too.
    if req.tools and req.tool_choice == "auto" and tool_calls:
        return {"reasoning": reasoning, "content": content, "tool_calls": calls(tool_calls, req)}, "tool_calls"
    return {"reasoning": reasoning, "content": content, "tool_calls": []}, case["finish_reason"]


def stream(case):
    """`chat_completion_stream_generator` for one choice: each delta's message, or None where
    no chunk is sent."""
    req = request(case)
    parser = Parser(Tokenizer(), req.tools)
    prompt = case.get("prompt_ids", [VOCAB["<think>"], TEXT])
    out, streamed = [], False
    for n, (ids, text) in enumerate(case["deltas"]):
        finished = n == len(case["deltas"]) - 1
        message = parser.parse_delta(text, list(ids), req, prompt_token_ids=prompt, finished=finished)
        if message is not None and message.tool_calls:
            streamed = True
        if message is None and not finished:
            out.append(None)
            continue
        message = message or DeltaMessage()
        delta = json.loads(message.model_dump_json(exclude_unset=True))
        if not req.parallel_tool_calls and "tool_calls" in delta:
            delta["tool_calls"] = [c for c in delta["tool_calls"] if c["index"] == 0]
        for call in delta.get("tool_calls", []):
            call["id"] = call["id"][:5] + "*" if call.get("id") else call.get("id")
        out.append(delta)
    return out, ("tool_calls" if streamed else case["finish_reason"])


def d(text, *ids):
    """A delta: its text and token ids (one text token when none are named)."""
    return [list(ids) or [TEXT], text]


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "threshold": {"type": "number"},
                    "hours": {"type": "array"},
                    "where": {"type": "object"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
THINK, END_THINK = VOCAB["<think>"], VOCAB["</think>"]
CALL, END_CALL = VOCAB["<minimax:tool_call>"], VOCAB["</minimax:tool_call>"]

CALL_DELTAS = [
    d("Let me check"),
    d(" the weather."),
    d("</think>", END_THINK),
    d("\n\n"),
    d("<minimax:tool_call>", CALL),
    d('\n<invoke name="get_weather">\n<parameter name="city">'),
    d("Seattle"),
    d('</parameter>\n<parameter name="days"> 3 </parameter>\n'),
    d("</invoke>\n"),
    d("</minimax:tool_call>", END_CALL),
    d("", EOS),
]

CASES = [
    {"name": "plain answer, no tools", "deltas": [d("Hello"), d(" there."), d("", EOS)], "finish_reason": "stop"},
    {
        "name": "reasoning then answer",
        "deltas": [d("Two plus two"), d("</think>", END_THINK), d("\n\nIt is 4."), d("", EOS)],
        "finish_reason": "stop",
    },
    {"name": "a tool call", "tools": WEATHER, "deltas": CALL_DELTAS, "finish_reason": "stop"},
    {"name": "a tool call's markup without tools", "deltas": CALL_DELTAS, "finish_reason": "stop"},
    {"name": "tools with tool_choice none", "tools": WEATHER, "tool_choice": "none", "deltas": CALL_DELTAS,
     "finish_reason": "stop"},
    {
        "name": "two calls, every schema type, quotes",
        "tools": WEATHER,
        "deltas": [
            d("</think>", END_THINK),
            d("<minimax:tool_call>", CALL),
            d("<invoke name='get_weather'>"),
            d('<parameter name="threshold">2.50</parameter><parameter name=metric>True</parameter>'),
            d('<parameter name="hours">[1, 2]</parameter><parameter name="where">{"lat": 1.5, "name": "Zürich"}'),
            d('</parameter><parameter name="note">null</parameter><parameter name="days">three</parameter>'),
            d('<parameter name="extra">{"a": 1}</parameter><parameter name="city">  Zürich \n</parameter></invoke>'),
            d('\n<invoke name="get_time"></invoke>'),
            d("</minimax:tool_call>", END_CALL),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "parallel_tool_calls false",
        "tools": WEATHER,
        "parallel_tool_calls": False,
        "deltas": [
            d("</think>", END_THINK),
            d("<minimax:tool_call>", CALL),
            d('<invoke name="get_time"></invoke><invoke name="get_weather"><parameter name="city">Oslo</parameter>'),
            d("</invoke>"),
            d("</minimax:tool_call>", END_CALL),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "a call without the end of reasoning",
        "tools": WEATHER,
        "deltas": [
            d("<minimax:tool_call>", CALL),
            d('<invoke name="get_time"></invoke>'),
            d("</minimax:tool_call>", END_CALL),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "a call cut off by the length",
        "tools": WEATHER,
        "deltas": [
            d("Hmm"),
            d("</think>", END_THINK),
            d("Sure. "),
            d("<minimax:tool_call>", CALL),
            d('<invoke name="get_weather"><parameter name="city">Li'),
        ],
        "finish_reason": "length",
    },
    {
        "name": "text after the call",
        "tools": WEATHER,
        "deltas": [
            d("</think>", END_THINK),
            d("Checking. "),
            d("<minimax:tool_call>", CALL),
            d('<invoke name="get_time"></invoke>'),
            d("</minimax:tool_call>", END_CALL),
            d(" Done."),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "reasoning ended in the prompt",
        "tools": WEATHER,
        "prompt_ids": [THINK, TEXT, END_THINK, TEXT],
        "deltas": [d("Sure. "), d("<minimax:tool_call>", CALL), d('<invoke name="get_time"></invoke>'),
                   d("</minimax:tool_call>", END_CALL), d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "text and the call's start in one delta",
        "tools": WEATHER,
        "deltas": [
            d("</think>", END_THINK),
            d("On it. <minimax:tool_call>", TEXT, CALL),
            d('<invoke name="get_time"></invoke>'),
            d("</minimax:tool_call>", END_CALL),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "several tokens to a delta",
        "tools": WEATHER,
        "deltas": [
            d("Ok</think>\n", TEXT, END_THINK, TEXT),
            d('<minimax:tool_call><invoke name="get_time">', CALL, TEXT),
            d("</invoke></minimax:tool_call>", TEXT, END_CALL, EOS),
        ],
        "finish_reason": "stop",
    },
]


def main():
    commit = sys.argv[2]
    cases = []
    for case in CASES:
        message, finish = whole(case)
        deltas, stream_finish = stream(case)
        cases.append(
            {
                **{k: v for k, v in case.items() if k != "finish_reason"},
                "engine_finish_reason": case["finish_reason"],
                "whole": {"message": message, "finish_reason": finish},
                "stream": {"deltas": deltas, "finish_reason": stream_finish},
            }
        )
    print(json.dumps({"fork": "kaitakuai/vllm@" + commit.strip(), "vocab": VOCAB, "cases": cases}, indent=1,
                     ensure_ascii=False))


main()
