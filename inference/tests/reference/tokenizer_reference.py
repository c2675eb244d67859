"""What transformers' tokenizer makes of texts and conversations, for a model directory: the
reference the engine's tokenizer and chat-template rendering are compared against.

    python tokenizer_reference.py '{"dir": "/tmp/m", "texts": ["…"],
                                    "chats": [{"messages": […], "add_generation_prompt": true,
                                               "kwargs": {"enable_thinking": false}}]}'

Prints JSON `{"encoded": [[id…]…], "decoded": ["…"…], "chats": ["…"…]}`.
"""

import json
import sys

from transformers import AutoTokenizer


def main():
    req = json.loads(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(req["dir"])
    encoded = [tok.encode(t, add_special_tokens=False) for t in req.get("texts", [])]
    out = {
        "encoded": encoded,
        "decoded": [tok.decode(ids) for ids in encoded],
        "chats": [
            tok.apply_chat_template(c["messages"], tokenize=False,
                                    add_generation_prompt=c.get("add_generation_prompt", False),
                                    tools=c.get("tools"), **c.get("kwargs", {}))
            for c in req.get("chats", [])
        ],
    }
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
