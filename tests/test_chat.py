"""The chat template: rendered exactly as ``transformers`` renders it from an export's
tokenizer_config.json, and tokenized with a response mask of exactly the assistant turns and their
end-of-sequence tokens."""

import pytest

from distllm.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    check_messages,
    load_chat_template,
)
from distllm.errors import ConfigError, DataError
from distllm.export import write_tokenizer_files
from distllm.tokenizer import EOT, eot_id, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

# ChatML-like, written the way Hub templates are: block tags on indented lines of their own (so the
# output depends on trim_blocks / lstrip_blocks), a namespace, a loop variable, tojson of HTML-like and
# non-ASCII text, and no
# {% generation %} markers (like most stock templates).
CHATML = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
<|im_start|>system {{ {"note": "<b>&é", "text": message.content} | tojson }}

    {% else %}
        {% if message.role == 'assistant' %}
            {% set ns.turns = ns.turns + 1 %}
        {% endif %}
<|im_start|>{{ message.role }} {{ ns.turns if message.role == 'assistant' else loop.index }}
{{ message.content }}{% if message.role == 'assistant' %}{{ eos_token }}{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant {{ ns.turns + 1 }}
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "List three colours."}, {"role": "assistant", "content": "Red, green, blue."}],
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And  3 + 3?\n"},
        {"role": "assistant", "content": " 6\n\n"},
    ],
    [
        {"role": "user", "content": "Grüße aus Köln — naïve café 🦙; Привет, мир! 日本語"},
        {"role": "assistant", "content": "Ærø ✓ ∑ ∞ ≠ e\u0301 👩‍👩‍👧"},
    ],
    [  # looks like markup, and a literal end-of-text string that must stay text
        {"role": "user", "content": "Say {{ eos_token }} and {% raw %} and <|endoftext|> literally"},
        {"role": "assistant", "content": "{{ eos_token }} <|endoftext|>"},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tok")
    text = " ".join(m["content"] for conv in CONVERSATIONS for m in conv)
    tok = train_tokenizer([text * 20, "### Instruction:\n### Response:\n<|im_start|>assistant user system " * 30], 400)
    save_tokenizer(tok, root / "tokenizer.json")
    return root, tok


def hf_tokenizer(tok_dir, template: ChatTemplate, name: str):
    from transformers import AutoTokenizer

    root, _ = tok_dir
    out = root / name
    out.mkdir()
    write_tokenizer_files(out, root / "tokenizer.json", 4096, template)
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("source", [DEFAULT_CHAT_TEMPLATE, CHATML], ids=["default", "chatml"])
def test_transformers_renders_the_exported_template_byte_identically(tok_dir, source):
    ours = ChatTemplate(source)
    hf = hf_tokenizer(tok_dir, ours, f"hf-{len(source)}")
    assert hf.chat_template == source
    for conv in CONVERSATIONS:
        for n in range(1, len(conv) + 1):
            for generation_prompt in (False, True):
                text = ours.render(conv[:n], add_generation_prompt=generation_prompt)
                assert text == hf.apply_chat_template(conv[:n], tokenize=False, add_generation_prompt=generation_prompt)


def test_the_default_template_is_the_alpaca_format():
    template = load_chat_template(None)
    conv = CONVERSATIONS[1]
    assert template.render(conv[:3]) == (
        "You answer in one line.\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\n4" + EOT
    )
    assert template.render(conv[:4], add_generation_prompt=True).endswith(
        "4" + EOT + "\n\n### Instruction:\nAnd  3 + 3?\n\n\n### Response:\n"
    )
    assert template.render([], add_generation_prompt=True) == "### Response:\n"


def response_text(tok, template, conv) -> list[str]:
    """The decoded runs of consecutive response tokens."""
    enc = template.encode(tok, conv)
    runs, run = [], []
    for i, m in zip(enc.ids.tolist(), enc.mask.tolist()):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("source", [DEFAULT_CHAT_TEMPLATE, CHATML], ids=["default", "chatml"])
def test_response_mask_is_each_assistant_turn_and_its_eos(tok_dir, source):
    _, tok = tok_dir
    template = ChatTemplate(source)
    for conv in CONVERSATIONS:
        expected = [m["content"] + EOT for m in conv if m["role"] == "assistant"]
        if source == CHATML:  # the template writes a newline after the end-of-sequence token, inside the turn
            expected = [e + "\n" for e in expected]
        assert response_text(tok, template, conv) == expected


def test_mask_agrees_with_transformers_generation_markers(tok_dir):
    """The default template marks assistant text with {% generation %}: transformers' own assistant
    mask (from those markers) must equal ours (from prefix renderings), given the same tokens."""
    _, tok = tok_dir
    template = load_chat_template(None)
    hf = hf_tokenizer(tok_dir, template, "hf-mask")
    for conv in CONVERSATIONS[:3]:  # no literal <|endoftext|> in the text: then transformers' tokens equal ours
        enc = template.encode(tok, conv)
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     tokenizer_kwargs={"split_special_tokens": False})
        assert out["input_ids"] == enc.ids.tolist()
        assert out["assistant_masks"] == enc.mask.astype(int).tolist()


def test_end_of_sequence_is_the_special_id_and_literal_text_stays_text(tok_dir):
    _, tok = tok_dir
    eos = eot_id(tok)
    template = load_chat_template(None)
    conv = CONVERSATIONS[3]
    ids = template.encode(tok, conv).ids.tolist()
    assert ids.count(eos) == 1 and ids[-1] == eos  # the template's one; the literal strings are plain text
    assert tok.decode(ids, skip_special_tokens=False) == template.render(conv)


def test_the_generation_prompt_encodes_as_a_prefix_of_the_training_tokens(tok_dir):
    """What `generate --chat` feeds the model is what it saw before each answer in training."""
    _, tok = tok_dir
    for source in (DEFAULT_CHAT_TEMPLATE, CHATML):
        template = ChatTemplate(source)
        for conv in CONVERSATIONS:
            full = template.encode(tok, conv).ids.tolist()
            prompt = template.encode(tok, conv[:-1], add_generation_prompt=True).ids.tolist()
            assert full[: len(prompt)] == prompt


def test_unusable_templates_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match="eos_token"):  # never ends an assistant turn: the model could not stop
        ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    with pytest.raises(ConfigError, match="literal text"):
        ChatTemplate("{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}")
    with pytest.raises(ConfigError, match="prefixes"):  # writes the message count first: not prefix-stable
        ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m.content + eos_token }}{% endfor %}")
    with pytest.raises(ConfigError, match="chat template file not found"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    assert load_chat_template(str(path)).source == CHATML
    assert load_chat_template(CHATML).source == CHATML


def test_malformed_conversations_name_the_place():
    where = "data.jsonl:7"
    cases = [
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
         "only the first message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "not text"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([], "non-empty list"),
    ]
    for messages, message in cases:
        with pytest.raises(DataError, match=message) as e:
            check_messages(messages, where)
        assert str(e.value).startswith(where)
