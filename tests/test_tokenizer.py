"""The builtin Qwen3 tokenizer: real Qwen ids, Qwen3's chat template, offline loading."""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from slime_router_core.tokenizers import (
    BUILTIN_CHECKPOINT,
    QWEN_PAT_STR,
    load_qwen_ranks,
    load_tokenizer,
    resolve_checkpoint,
)
from slime_router_testing.tokenizer import QWEN3_SPECIAL_TOKENS, builtin_tokenizer_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


@pytest.fixture(scope="module")
def tiktoken_enc():
    import tiktoken

    return tiktoken.Encoding(
        "qwen-test",
        pat_str=QWEN_PAT_STR,
        mergeable_ranks=load_qwen_ranks(),
        special_tokens={content: tid for tid, content, _ in QWEN3_SPECIAL_TOKENS},
    )


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "text,ids",
    [
        ("Hello", [9707]),
        ("Hello world", [9707, 1879]),
        (" world", [1879]),
        ("\n", [198]),
        ("\n\n", [271]),
        ("user", [872]),
        ("assistant", [77091]),
        ("你好", [108386]),
        ("<|endoftext|>", [151643]),
        ("<|im_start|>", [151644]),
        ("<|im_end|>", [151645]),
        ("<tool_call>", [151657]),
        ("</tool_call>", [151658]),
        ("<tool_response>", [151665]),
        ("</tool_response>", [151666]),
        ("<think>", [151667]),
        ("</think>", [151668]),
        ("<|im_start|>user\nHello<|im_end|>\n", [151644, 872, 198, 9707, 151645, 198]),
    ],
)
def test_known_ids(tok, text, ids):
    assert enc(tok, text) == ids


def test_all_special_token_ids(tok):
    for tid, content, _ in QWEN3_SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(content) == tid
        assert enc(tok, content) == [tid]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert len(tok) == 151669


def test_skip_special_tokens_keeps_think_and_tool_tags(tok):
    text = "<think>\nhmm\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    ids = enc(tok, text + "<|im_end|>")
    assert ids[-1] == 151645
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids, skip_special_tokens=False) == text + "<|im_end|>"
    assert tok.decode(enc(tok, "<|im_start|>user\nhi<|im_end|><|endoftext|>"), skip_special_tokens=True) == "user\nhi"


def test_chinese_and_roundtrip(tok, tiktoken_enc):
    text = "你好，世界！今天天气怎么样？"
    ids = enc(tok, text)
    assert ids == tiktoken_enc.encode(text)
    assert ids[:1] == [108386]
    assert tok.decode(ids) == text


def test_matches_tiktoken_on_documents(tok, tiktoken_enc):
    for path in [__file__, "/work/shared/token-exactness.md"]:
        if not os.path.exists(path):
            continue
        text = unicodedata.normalize("NFC", open(path, encoding="utf-8").read())
        assert enc(tok, text) == tiktoken_enc.encode(text, allowed_special="all")


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_alphabet = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.sampled_from(list(" \n\t\r'.,!?-_0123456789abcXYZ") + ["'s", "'ll", "  ", "\n\n", "中文", "é", "😀"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_bpe_matches_tiktoken_random_unicode(tok, tiktoken_enc, text):
    text = unicodedata.normalize("NFC", text)
    ids = enc(tok, text)
    assert ids == tiktoken_enc.encode_ordinary(text)
    assert tok.decode(ids) == text


# ---------------------------------------------------------------- chat template


def chat(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_chat_two_turns(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    assert chat(tok, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat(tok, messages[:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_generation_prompt_enable_thinking(tok):
    messages = [{"role": "user", "content": "Hi"}]
    base = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat(tok, messages, add_generation_prompt=True) == base
    assert chat(tok, messages, add_generation_prompt=True, enable_thinking=True) == base
    assert chat(tok, messages, add_generation_prompt=True, enable_thinking=False) == base + "<think>\n\n</think>\n\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert list(ids) == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]


def test_reasoning_content_kept_only_after_last_query(tok):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
    ]
    assert chat(tok, messages) == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
    )
    # <think> inside content is parsed the same way
    messages[1] = {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"}
    messages[3] = {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"}
    assert chat(tok, messages).endswith(
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def test_tools_system_block(tok):
    out = chat(tok, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Weather?"}], tools=TOOLS,
               add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nSys.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TOOLS[0])
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
        "</tool_call><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_calls_and_grouped_tool_responses(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
    ]
    out = chat(tok, messages, tools=TOOLS, add_generation_prompt=True)
    assert out.endswith(
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n"  # not the last message and no reasoning: no empty think block
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_resolve_checkpoint():
    assert resolve_checkpoint(BUILTIN_CHECKPOINT) == builtin_tokenizer_dir()
    assert resolve_checkpoint("/some/model") == "/some/model"


def test_build_into_fresh_cache_dir(tmp_path):
    d = builtin_tokenizer_dir(tmp_path)
    assert d == tmp_path / "qwen3-tokenizer-v1"
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"]:
        assert (d / name).is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] == 151936 and cfg["eos_token_id"] == 151645
    assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())
    assert builtin_tokenizer_dir(tmp_path) == d  # second call: cached
    assert not [p for p in tmp_path.iterdir() if p.name != d.name]  # no temp leftovers
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(d))
    assert t.encode("Hello world", add_special_tokens=False) == [9707, 1879]


def test_construction_copies_released_and_tokenizer_unchanged(tok):
    """The vocabulary and merges transformers keeps as Python objects after building the Rust backend (~65 MB for
    Qwen3) are dropped; the tokenizer answers exactly as one that keeps them."""
    from transformers import AutoTokenizer

    kept = AutoTokenizer.from_pretrained(str(resolve_checkpoint(BUILTIN_CHECKPOINT)))
    assert len(kept.__dict__["_merges"]) > 100_000 and len(kept.__dict__["_vocab"]) > 100_000
    assert tok.__dict__["_merges"] == [] and tok.__dict__["_vocab"] == {}
    texts = ["hello 你好 world", " leading space", "<think>\nx</think>\n\n<tool_call>{}</tool_call>", "e\u0301 ok"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == kept.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == kept.decode(ids)
        assert tok.convert_ids_to_tokens(ids) == kept.convert_ids_to_tokens(ids)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == kept.apply_chat_template(chat, tokenize=False)
    assert tok.get_vocab() == kept.get_vocab() and len(tok) == len(kept)


def test_construction_copies_kept_where_a_method_reads_them():
    from slime_router_core.tokenizers import release_construction_copies

    class Backend:
        pass

    class Builds:
        def __init__(self) -> None:
            self._vocab = {"a": 0}
            self._merges = [("a", "b")]
            self.backend_tokenizer = Backend()

    class Saves(Builds):
        def save(self) -> list:
            return [self._vocab]

    assert release_construction_copies(Builds())._vocab == {}
    assert release_construction_copies(Saves())._vocab == {"a": 0}
