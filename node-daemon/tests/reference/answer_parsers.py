"""Records what gonka's vLLM fork makes of answers under governance's parser arguments, for the
native engine's answer parsers to be tested against (read by
`node-daemon/src/inference/answer_parsers`):

- `minimax_m2` (MiniMax-M2.7: `--enable-auto-tool-choice --tool-call-parser minimax_m2
  --reasoning-parser minimax_m2_append_think`) → `minimax_m2_parsers.json`;
- `glm` (GLM-5.3-Flash: `--tool-call-parser glm47 --reasoning-parser glm45`) →
  `glm_parsers.json`.

It runs the fork's own parser code: the tool-call and reasoning parsers, its schema coercion
(`tool_parsers/utils.py`) and its `DelegatingParser` (which joins them, whole and streamed),
loaded from a checkout of the fork into vLLM's CPU build (the `scripts/vllm-env.sh` venv), whose
classes stand in for the fork's protocol types. The serving layer's decisions around the parser
(when tools are parsed at all, `finish_reason`, which streamed deltas are sent) are restated
from the fork's `chat_completion/serving.py` in `whole()` and `stream()` below.

    python answer_parsers.py FORK_TREE COMMIT minimax_m2 > minimax_m2_parsers.json
    python answer_parsers.py FORK_TREE COMMIT glm > glm_parsers.json

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
FAMILY = sys.argv[3]

# The special tokens' ids in this made-up vocabulary (the models' own are 150000-odd or more);
# every other piece of text is token 7, the end of sequence 2.
VOCAB = {
    "minimax_m2": {"<think>": 900, "</think>": 901, "<minimax:tool_call>": 902, "</minimax:tool_call>": 903},
    "glm": {"<think>": 900, "</think>": 901, "<tool_call>": 904, "</tool_call>": 905, "<arg_key>": 906,
            "</arg_key>": 907, "<arg_value>": 908, "</arg_value>": 909},
}[FAMILY]
TEXT, EOS = 7, 2


class Tokenizer:
    def get_vocab(self):
        return dict(VOCAB)


def load(name, relative):
    """The fork's file `relative`, as module `name`."""
    module = types.ModuleType(name)
    module.__file__ = str(FORK / relative)
    module.__package__ = name.rpartition(".")[0]
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

abstract_parser = load("fork_abstract_parser", "vllm/parser/abstract_parser.py")
if FAMILY == "minimax_m2":
    tool_parser_module = load("fork_minimax_m2_tool_parser", "vllm/tool_parsers/minimax_m2_tool_parser.py")
    reasoning_module = load("fork_minimax_m2_reasoning_parser", "vllm/reasoning/minimax_m2_reasoning_parser.py")

    class Parser(abstract_parser.DelegatingParser):
        reasoning_parser_cls = reasoning_module.MiniMaxM2AppendThinkReasoningParser
        tool_parser_cls = tool_parser_module.MinimaxM2ToolParser
else:
    load("fork_glm4_moe_tool_parser", "vllm/tool_parsers/glm4_moe_tool_parser.py")
    sys.modules["vllm.tool_parsers.glm4_moe_tool_parser"] = sys.modules["fork_glm4_moe_tool_parser"]
    for name in ("basic_parsers", "deepseek_r1_reasoning_parser", "identity_reasoning_parser"):
        sys.modules[f"vllm.reasoning.{name}"] = load(f"vllm.reasoning.{name}", f"vllm/reasoning/{name}.py")
    glm47 = load("fork_glm47_moe_tool_parser", "vllm/tool_parsers/glm47_moe_tool_parser.py")
    v3 = load("vllm.reasoning.deepseek_v3_reasoning_parser", "vllm/reasoning/deepseek_v3_reasoning_parser.py")

    class Parser(abstract_parser.DelegatingParser):
        reasoning_parser_cls = v3.DeepSeekV3ReasoningWithThinkingParser
        tool_parser_cls = glm47.Glm47MoeModelToolParser


def request(case):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for key in ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"):
        if key in case:
            body[key] = case[key]
    return ChatCompletionRequest.model_validate(body)


def parser(req):
    """A request's parser, as the serving layer makes one: the chat template's arguments go to
    the reasoning parser (GLM's picks thinking or not from them)."""
    return Parser(Tokenizer(), req.tools, chat_template_kwargs=dict(req.chat_template_kwargs or {}))


def calls(tool_calls, req):
    out = [{"name": c.name, "arguments": c.arguments} for c in tool_calls or []]
    return out if req.parallel_tool_calls else out[:1]


def whole(case):
    """`chat_completion_full_generator` for one choice: the message and the finish reason."""
    req = request(case)
    text = "".join(piece for _, piece in case["deltas"])
    reasoning, content, tool_calls = parser(req).parse(text, req, enable_auto_tools=True)
    if not req.include_reasoning:
        reasoning = None
    finish = case["finish_reason"]
    choice = req.tool_choice
    if not isinstance(choice, str) and choice is not None:
        # A named tool: its calls, no content; the engine's finish reason.
        return {"reasoning": reasoning, "content": "", "tool_calls": calls(tool_calls, req)}, finish
    if choice == "required":
        message = {"reasoning": reasoning, "content": "", "tool_calls": calls(tool_calls, req)}
        return message, "tool_calls" if finish == "stop" else finish
    # A null or "none" choice gets the content alone; "auto" with tools gets the calls too.
    if req.tools and choice == "auto" and tool_calls:
        return {"reasoning": reasoning, "content": content, "tool_calls": calls(tool_calls, req)}, "tool_calls"
    return {"reasoning": reasoning, "content": content, "tool_calls": []}, finish


def stream(case):
    """`chat_completion_stream_generator` for one choice: each delta's message, or None where
    no chunk is sent."""
    req = request(case)
    stream_parser = parser(req)
    prompt = case.get("prompt_ids", [VOCAB["<think>"], TEXT])
    out, streamed = [], False
    for n, (ids, text) in enumerate(case["deltas"]):
        finished = n == len(case["deltas"]) - 1
        try:
            message = stream_parser.parse_delta(text, list(ids), req, prompt_token_ids=prompt, finished=finished)
        except Exception as error:  # noqa: BLE001 - the serving layer sends any as an error event
            # The stream ends with an error event (then [DONE]).
            out.append({"error": type(error).__name__})
            return out, None
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
            if call.get("id"):
                call["id"] = call["id"][: call["id"].index("-tool-") + 6 if "-tool-" in call["id"] else 5] + "*"
        out.append(delta)
    named = not isinstance(req.tool_choice, str) and req.tool_choice is not None
    return out, ("tool_calls" if streamed and not named else case["finish_reason"])


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
CALL, END_CALL = VOCAB.get("<minimax:tool_call>"), VOCAB.get("</minimax:tool_call>")

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

MINIMAX_CASES = [
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


# The same tools (their schemas decide how GLM's parser types values).
GLM_WEATHER = WEATHER
G_THINK, G_END_THINK = VOCAB.get("<think>"), VOCAB.get("</think>")
G_CALL, G_END_CALL = VOCAB.get("<tool_call>"), VOCAB.get("</tool_call>")
G_KEY, G_END_KEY, G_VALUE, G_END_VALUE = (VOCAB.get(t) for t in ("<arg_key>", "</arg_key>", "<arg_value>",
                                                                 "</arg_value>"))


def call_deltas(name, *pairs, close=True):
    """A GLM call a token at a time: `<tool_call>name<arg_key>k</arg_key><arg_value>v…`."""
    out = [d("<tool_call>", G_CALL), d(name)]
    for key, value in pairs:
        out += [d("<arg_key>", G_KEY), d(key), d("</arg_key>", G_END_KEY), d("<arg_value>", G_VALUE)]
        out += [d(piece) for piece in value]
        out += [d("</arg_value>", G_END_VALUE)]
    if close:
        out.append(d("</tool_call>", G_END_CALL))
    return out


GLM_CASES = [
    {"name": "plain answer, thinking", "deltas": [d("Hm"), d("</think>", G_END_THINK), d("Hello."), d("", EOS)],
     "finish_reason": "stop"},
    {"name": "thinking off", "chat_template_kwargs": {"enable_thinking": False},
     "prompt_ids": [G_THINK, G_END_THINK], "deltas": [d("Hello"), d(" there."), d("", EOS)], "finish_reason": "stop"},
    {"name": "thinking with its start in the answer",
     "deltas": [d("<think>", G_THINK), d("Hm"), d("</think>", G_END_THINK), d("Hi."), d("", EOS)],
     "finish_reason": "stop"},
    {"name": "reasoning cut off by the length", "deltas": [d("Let me"), d(" think")], "finish_reason": "length"},
    {
        "name": "a call",
        "tools": GLM_WEATHER,
        "deltas": [d("Look it up."), d("</think>", G_END_THINK), d("Checking.")]
        + call_deltas("get_weather", ("city", ["Bei", "jing "]), ("days", [" 3"]))
        + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "two calls, literal values, no thinking",
        "tools": GLM_WEATHER,
        "chat_template_kwargs": {"thinking": False},
        "prompt_ids": [G_THINK, G_END_THINK],
        "deltas": call_deltas("get_weather", ("days", ["tr", "ue"]), ("where", ["{'lat': 1.5, ", "'n': None}"]),
                              ("note", ["null"]), ("extra", ["(1, 2)"]), ("more", ["[1,", " 2.50]"]))
        + [d("\n")]
        + call_deltas("get_time")
        + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "a call's name on its own line",
        "tools": GLM_WEATHER,
        "deltas": [d("</think>", G_END_THINK), d("<tool_call>", G_CALL), d("get_weather\n"), d("<arg_key>", G_KEY),
                   d("city"), d("</arg_key>", G_END_KEY), d("\n"), d("<arg_value>", G_VALUE), d("Oslo"),
                   d("</arg_value>", G_END_VALUE), d("\n"), d("</tool_call>", G_END_CALL), d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "a call cut off",
        "tools": GLM_WEATHER,
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_weather", ("city", ["Li", "ma"]), close=False)[:-1],
        "finish_reason": "length",
    },
    {
        "name": "a required call",
        "tools": GLM_WEATHER,
        "tool_choice": "required",
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_time") + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "a named call",
        "tools": GLM_WEATHER,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_weather", ("city", ["Rome"])) + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "tools with tool_choice none",
        "tools": GLM_WEATHER,
        "tool_choice": "none",
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_time") + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "a call's markup without tools",
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_time") + [d("", EOS)],
        "finish_reason": "stop",
    },
    {
        "name": "text between and after calls, several tokens to a delta",
        "tools": GLM_WEATHER,
        "parallel_tool_calls": False,
        "deltas": [
            d("Ok</think>A <tool", TEXT, G_END_THINK, TEXT),
            d("_call>get_time</tool_call> B <tool_call>get_weather<arg_key>city</arg_key><arg_value>X", TEXT),
            d("</arg_value></tool_call> C", G_END_VALUE, G_END_CALL, TEXT),
            d("", EOS),
        ],
        "finish_reason": "stop",
    },
    {
        "name": "a value that is not JSON",
        "tools": GLM_WEATHER,
        "deltas": [d("</think>", G_END_THINK)] + call_deltas("get_weather", ("days", ["{1, 2}"])) + [d("", EOS)],
        "finish_reason": "stop",
    },
]
CASES = {"minimax_m2": MINIMAX_CASES, "glm": GLM_CASES}[FAMILY]


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
