"""Records DeepSeek-V4's chat prompts as the network's vLLM writes them under
`--tokenizer-mode deepseek_v4`, for the native engine's encoding (`inference/src/deepseek_v4_chat.rs`)
and the daemon's request handling (`node-daemon/src/inference/conversation.rs`) to be tested
against (`node-daemon/tests/inference_api.rs` reads `deepseek_v4_chat.json`).

The network's ML nodes run vLLM 0.25.1 (`mlnode:3.0.16`: stock 0.25.1 with gonka's PoC seams,
which leave the tokenizer alone; gonka's fork on 0.23, kaitakuai/vllm `poc-sampler-residual-v0.23`
at 69063b1, carries the same encoding files byte for byte). This script runs that version's own
code as its `deepseek_v4` renderer does: the chat parser (`parse_chat_messages`, content format
"string"), the tools as its request model writes them back (`ChatCompletionToolsParam.model_dump()`),
and its tokenizer wrapper (`tokenizers/deepseek_v4.py`, `get_deepseek_v4_tokenizer`, which reads
the request's `chat_template_kwargs`) over its encoding (`tokenizers/deepseek_v4_encoding.py`).
Run it with vLLM 0.25.1 installed beside the CPU build's dependencies, as
`node-daemon/tests/reference/chat_conversation.py` says:

    /tmp/v0251/bin/python deepseek_v4_chat_reference.py > deepseek_v4_chat.json

Only the model configuration is stood in for (text messages read none of it), and the tokenizer
is an empty one: the wrapper writes text. The daemon's test tokenises the texts with transformers
(`tokenizer_reference.py`), as the wrapper does (`encode(prompt, add_special_tokens=False)`).

Prints JSON `[{"name", "messages", "tools", "kwargs", "text"}]`, or `"error"` in place of
`"text"` where vLLM refuses the case.
"""

import copy
import json
import os
import sys
import types

# vLLM logs to standard output, where the record goes.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

import vllm  # noqa: E402
from vllm.entrypoints.chat_utils import parse_chat_messages  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam  # noqa: E402
from vllm.tokenizers.deepseek_v4 import get_deepseek_v4_tokenizer  # noqa: E402

assert vllm.__version__.startswith("0.25.1"), vllm.__version__


class ModelConfig(types.SimpleNamespace):
    """Nothing configured: no multimodal inputs, no prompt embeddings, no local media."""

    def __getattr__(self, name):
        return None


class Vocabulary:
    """A tokenizer with nothing in it: the wrapper subclasses it and writes text."""

    vocab_size = 0

    def get_added_vocab(self):
        return {}


EARLIER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
CALLS = [
    {"role": "user", "content": "Weather in Paris for 2 days, and the time?"},
    {"role": "assistant", "content": "", "reasoning": "Both tools.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "get_weather",
            "arguments": "{\"city\": \"Paris\", \"days\": 2, \"options\": {\"unit\": \"C\", \"hourly\": false}}"}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]},
    # Answered in the other order: the encoding sorts them by call.
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
]
THINK = {"thinking": True}

CASES = [
    ("chat mode by default", [{"role": "user", "content": "Hi"}], None, None),
    ("thinking", [{"role": "user", "content": "Hi"}], None, THINK),
    ("enable_thinking", [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], None,
     {"enable_thinking": True}),
    ("thinking off", [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], None,
     {"thinking": False}),
    ("earlier reasoning dropped", EARLIER, None, THINK),
    ("earlier reasoning kept", EARLIER, None, {"thinking": True, "drop_thinking": False}),
    ("earlier turns in chat mode", EARLIER, None, None),
    ("max effort", EARLIER, None, {"thinking": True, "reasoning_effort": "max"}),
    ("xhigh effort", EARLIER, None, {"thinking": True, "reasoning_effort": "xhigh"}),
    ("high effort", EARLIER, None, {"thinking": True, "reasoning_effort": "high"}),
    ("max effort in chat mode", EARLIER, None, {"reasoning_effort": "max"}),
    ("effort none", EARLIER, None, {"enable_thinking": True, "reasoning_effort": "none"}),
    ("tools called and answered, thinking", CALLS, TOOLS, THINK),
    ("tools called and answered, chat", CALLS, TOOLS, None),
    ("tools beside a system turn", [{"role": "system", "content": "Use tools."},
                                    {"role": "user", "content": "Time?"}], TOOLS, THINK),
    ("tool results without tools offered", CALLS, None, THINK),
    ("arguments as an object", [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
    ], None, None),
    ("consecutive user turns", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None, None),
    ("text parts", [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     None, None),
    ("a developer turn", [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}], None,
     THINK),
    ("a developer's tools", [{"role": "developer", "content": "Use them.", "tools": TOOLS[1:]}], None, THINK),
    ("a last system turn", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                            {"role": "system", "content": "z"}], None, None),
    ("a system turn before an answer", [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
     None, THINK),
    ("a latest reminder", [{"role": "user", "content": "x"}, {"role": "latest_reminder", "content": "today"}], None,
     THINK),
    ("a task", [{"role": "user", "content": "Paris in spring", "task": "title"}], None, THINK),
    ("an action task", [{"role": "system", "content": "S"}, {"role": "user", "content": "go", "task": "action"}],
     None, THINK),
    ("a task answered, then a turn", [
        {"role": "user", "content": "q", "task": "query"},
        {"role": "assistant", "content": "weather paris", "reasoning": "unused"},
        {"role": "user", "content": "and?"},
    ], None, {"thinking": True, "drop_thinking": False}),
    ("a tasked user turn does not take the next", [{"role": "user", "content": "a", "task": "domain"},
                                                   {"role": "user", "content": "b"}], None, None),
    ("unicode", [{"role": "user", "content": "東京 café 🚀"}], None, THINK),
    ("a developer turn without content", [{"role": "developer", "content": ""}], None, None),
    ("an unknown task", [{"role": "user", "content": "x", "task": "poem"}], None, None),
]


def main():
    tokenizer = get_deepseek_v4_tokenizer(Vocabulary())
    out = []
    for name, messages, tools, kwargs in CASES:
        case = {"name": name, "messages": messages, "tools": tools, "kwargs": kwargs}
        try:
            conversation, _, _ = parse_chat_messages(copy.deepcopy(messages), ModelConfig(), content_format="string")
            written = None if tools is None else [ChatCompletionToolsParam.model_validate(t).model_dump() for t in tools]
            case["text"] = tokenizer.apply_chat_template(messages, tools=written, tokenize=False,
                                                         conversation=conversation, **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 — the refusal is the answer
            case["error"] = f"{type(e).__name__}: {e}"
        out.append(case)
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
