"""DeepSeek-V4's chat prompts as vLLM renders them under `--tokenizer-mode deepseek_v4`: its own
tokenizer wrapper (`vllm.tokenizers.deepseek_v4.get_deepseek_v4_tokenizer`, which reads the
request's `chat_template_kwargs` and calls `deepseek_v4_encoding.encode_messages`) over the
model directory's tokenizer. Run with the Python that has vLLM (`scripts/vllm-env.sh`).

    python deepseek_v4_chat_reference.py '{"dir": "/tmp/m", "cases": [{"messages": [...],
                                           "tools": [...], "kwargs": {...}}]}'

Prints JSON `[{"text": ..., "ids": [...]}]`, one per case, or `{"error": ...}` where vLLM
refuses the case.
"""

import json
import sys

import transformers
from vllm.tokenizers.deepseek_v4 import get_deepseek_v4_tokenizer


def main():
    req = json.loads(sys.argv[1])
    tokenizer = get_deepseek_v4_tokenizer(transformers.AutoTokenizer.from_pretrained(req["dir"]))
    out = []
    for case in req["cases"]:
        kwargs = case.get("kwargs") or {}
        try:
            text = tokenizer.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False, **kwargs)
            ids = tokenizer.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=True, **kwargs)
            out.append({"text": text, "ids": list(ids)})
        except Exception as e:  # noqa: BLE001 — the refusal is the answer
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
