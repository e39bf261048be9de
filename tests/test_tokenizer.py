"""tokenizer.py against Hugging Face's tokenizers on tokenizers trained here (nothing downloaded)."""
import base64
import json
import os
import random
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode  # noqa: E402

import data  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# written out here, not imported, so a typo in tokenizer.py cannot hide
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
CHATML_TEMPLATE = (  # Qwen2.5's template minus tools: a default system message when none is given
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

WORDS = ("the quick brown fox jumps over lazy dog I'm you're they'll it's we've DON'T She'd "
         "solution answer equation compute therefore integer Let's def return print self import range "
         "naïve café résumé Ünïcödé straße 数学 是 科学 的 语言 こんにちは 世界 안녕하세요 Привет мир "
         "مرحبا שלום 😀 🎉 👍🏽 🇫🇷 ∑ ∫ √ ≤ π λ").split()
PUNCT = list(".,;:!?()[]{}<>+-*/=%$#@&|^~`\"'\\_") + ["...", "->", "==", "!=", "**", "//", "\\frac{1}{2}", "$x^2$"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "    \n\n   ", "\u00a0", "\u3000", "\u2009"]


def random_text(rng, specials=()):
    parts = []
    for _ in range(rng.randint(1, 25)):
        r = rng.random()
        if r < 0.45:
            parts.append(rng.choice(WORDS))
        elif r < 0.6:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        elif r < 0.75:
            parts.append(rng.choice(PUNCT))
        elif r < 0.8:
            parts.append("e\u0301" if rng.random() < 0.5 else "A\u030a")  # decomposed: NFC composes them
        elif r < 0.83 and specials:
            parts.append(rng.choice(specials))
        elif r < 0.86:
            parts.append(chr(rng.randint(0x20, 0x2FFF)))  # any character, unpaired combining marks included
        else:
            parts.append(rng.choice(SPACES))
        if rng.random() < 0.5:
            parts.append(" ")
    return "".join(parts)


HAND_WRITTEN = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t\t", "a", "Hello world", "Hello  world  ", " leading space",
    "trailing spaces   ", "x\n\n  y", "1234567890", "3.14159", "1,000,000", "-42", "2^{10}=1024",
    "I'm here, you're there, it's 'quoted'", "DON'T SHOUT", "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tprint(i)  # comment\n", "if a != b and c <= d: pass", "数学是科学的语言。",
    "こんにちは、世界！", "안녕하세요", "Привет, мир!", "😀😀😀", "👍🏽 🇫🇷", "e\u0301", "cafe\u0301 vs café",
    "\u00a0nbsp\u3000ideographic", "\\boxed{\\frac{a}{b}}", "$$x^2 + y^2 = z^2$$", "<|im_start|>", "<|im_end|>\n",
    "a<|endoftext|>b", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\u0338",
    "<|im_start", "|im_end|>", "<<|im_end|>>", "\ufffd", "\x00\x01\x7f", "tab\there", "mixed\r\nline\rends\n",
]


def all_strings():
    rng = random.Random(0)
    return HAND_WRITTEN + [random_text(rng, CHATML) for _ in range(220)]


@pytest.fixture(scope="module")
def hf_tok():
    """A small Qwen2-style byte-level BPE: Qwen2's Split regex + ByteLevel, NFC, ChatML tokens after the vocab."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    corpus = [random_text(rng) for _ in range(3000)]
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(CHATML)
    assert tok.get_vocab_size() > 1000  # enough merges to mean something
    return tok


@pytest.fixture(scope="module")
def hf_dir(hf_tok, tmp_path_factory):
    """Hugging Face layout: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    d = tmp_path_factory.mktemp("qwen_tok")
    PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token="<|im_end|>",
                            chat_template=CHATML_TEMPLATE).save_pretrained(d)
    return d


def hf_ids(hf_tok, text, allow_special):
    hf_tok.encode_special_tokens = not allow_special
    try:
        return hf_tok.encode(text, add_special_tokens=False).ids
    finally:
        hf_tok.encode_special_tokens = False


def test_tokenizer_json_matches_hf(hf_tok, hf_dir):
    tok = Tokenizer.from_pretrained(hf_dir)
    assert tok.chat_format == "chatml" and tok.vocab_size == hf_tok.get_vocab_size()
    assert tok.eot_id == hf_tok.token_to_id("<|im_end|>") and tok.bos_id is None
    assert tok.stop_ids == (hf_tok.token_to_id("<|im_end|>"), hf_tok.token_to_id("<|endoftext|>"))
    strings = all_strings()
    assert len(strings) >= 250
    for s in strings:
        for allow in (True, False):
            ids = tok.encode(s, allow_special=allow)
            assert ids == hf_ids(hf_tok, s, allow), (s, allow)
            assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s), s
    assert max(tok.encode("".join(strings))) < tok.vocab_size


def test_vocab_merges_layout(hf_tok, hf_dir, tmp_path):
    """The older vocab.json + merges.txt layout, special tokens from tokenizer_config.json."""
    hf_tok.model.save(str(tmp_path))
    added = {str(hf_tok.token_to_id(s)): {"content": s, "special": True} for s in CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    a, b = Tokenizer.from_pretrained(tmp_path), Tokenizer.from_pretrained(hf_dir)
    for s in all_strings():
        assert a.encode(s, allow_special=True) == b.encode(s, allow_special=True), s


def test_merge_order_is_checked(hf_dir, tmp_path):
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    merges[10], merges[500] = merges[500], merges[10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="merge order"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("normalizer", {"type": "NFKC"}, "normalizer"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True},
     "pre_tokenizer"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?<=a"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}, "pattern"),
])
def test_unsupported_tokenizer_json(hf_dir, tmp_path, key, value, message):
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tj[key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=f"tokenizer.json: .*{message}"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_matches_hf(hf_dir):
    """render() == apply_chat_template(), given the system message the template would insert."""
    tok, hf = Tokenizer.from_pretrained(hf_dir), PreTrainedTokenizerFast.from_pretrained(hf_dir)
    default_system = {"role": "system", "content": "You are a helpful assistant."}
    convs = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve x^2 = 4.\n"}],
        [{"role": "user", "content": "数学 😀"}, {"role": "assistant", "content": "The answer is \\boxed{4}."},
         {"role": "user", "content": "There might be an error in the solution above. Please correct it."}],
    ]
    rng = random.Random(4)  # any content that does not start with whitespace (see tokenizer.py's docstring)
    convs += [[{"role": "user", "content": random_text(rng).lstrip()},
               {"role": "assistant", "content": random_text(rng).lstrip()},
               {"role": "user", "content": random_text(rng).lstrip()}] for _ in range(30)]
    for msgs in convs:
        expected = hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
        full = msgs if msgs[0]["role"] == "system" else [default_system] + msgs
        assert tok.render(full) == expected


def check_followup_invariant(tok, rng):
    msgs = [{"role": "user", "content": "Problem: 1 + 1?"}]
    more = [{"role": "user", "content": "There might be an error. Correct it."}]
    for y in ["The answer is 2.", "\n\nleading newlines", "  spaces ", "", "x<|im_end|>y<|eot_id|>",
              *(random_text(rng) for _ in range(20))]:
        for first in (msgs, [{"role": "system", "content": "sys"}] + msgs):
            lhs = tok.render(first) + tok.encode(y) + [tok.eot_id] + tok.render_followup(more)
            assert lhs == tok.render(first + [{"role": "assistant", "content": y}] + more), y


def test_render_followup_invariant(hf_dir, llama_dir):
    rng = random.Random(2)
    for tok in (Tokenizer.from_pretrained(hf_dir), Tokenizer.from_pretrained(llama_dir), Tokenizer.byte_level()):
        check_followup_invariant(tok, rng)
    chatml = Tokenizer.from_pretrained(hf_dir)
    assert chatml.render_followup([])[:len(chatml.encode("\n"))] == chatml.encode("\n")
    with pytest.raises(ValueError, match="role"):
        chatml.render([{"role": "tool", "content": "x"}])


# ---------------------------------------------------------------------------- Llama 3 (tiktoken format)
@pytest.fixture(scope="module")
def llama_dir(hf_tok, tmp_path_factory):
    """A tokenizer.model in Llama 3's format (base64 token, rank), ranks taken from the trained BPE."""
    d = tmp_path_factory.mktemp("llama_tok")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    specials = {hf_tok.token_to_id(s) for s in CHATML}
    ranks = sorted((i, bytes(byte_of[c] for c in t)) for t, i in hf_tok.get_vocab().items() if i not in specials)
    assert [i for i, _ in ranks] == list(range(len(ranks)))
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in ranks))
    return d


def test_llama3_tokenizer_model_matches_hf(llama_dir, tmp_path):
    """tokenizer.model against HF's own conversion of it (TikTokenConverter, Llama 3's pattern)."""
    tok = Tokenizer.from_pretrained(llama_dir)
    n = tok.vocab_size - 256
    assert tok.chat_format == "llama3" and tok.bos_id == n and tok.eot_id == n + 9
    assert tok.stop_ids == (n + 9, n + 1, n + 8)  # <|eot_id|>, <|end_of_text|>, <|eom_id|>
    hf_tok = TikTokenConverter(str(llama_dir / "tokenizer.model"), extra_special_tokens=LLAMA3).converted()
    hf_tok.save(str(tmp_path / "tokenizer.json"))  # the HF layout of a Llama 3 tokenizer: every split is a merge
    from_json = Tokenizer.from_pretrained(tmp_path)
    assert from_json.chat_format == "llama3" and from_json.bos_id == n
    rng = random.Random(3)
    strings = HAND_WRITTEN + [random_text(rng, LLAMA3[:12]) for _ in range(200)]
    for s in strings:
        ids = tok.encode(s, allow_special=True)
        assert ids == hf_ids(hf_tok, s, True) == from_json.encode(s, allow_special=True), s
        assert tok.encode(s) == hf_ids(hf_tok, s, False), s
        assert tok.decode(ids) == s  # no normalizer in Llama 3
    assert tok.encode("1234567") == tok.encode("123") + tok.encode("456") + tok.encode("7")  # \p{N}{1,3}
    hf = PreTrainedTokenizerFast(tokenizer_object=hf_tok, bos_token="<|begin_of_text|>", chat_template=LLAMA3_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"}]
    convs = [msgs] + [[{"role": r, "content": random_text(rng).lstrip()} for r in ("user", "assistant", "user")]
                      for _ in range(20)]
    for msgs in convs:
        assert tok.render(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)


def test_llama3_chat_format_by_hand(tmp_path):
    """Llama 3's chat format on a ranks file small enough to write every id by hand."""
    ranks = [bytes([b]) for b in range(256)] + [b"\n\n", b"us", b"er", b"user", b"hi"]  # ids 256..260
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(b).decode()} {i}\n"
                                                      for i, b in enumerate(ranks)))
    tok = Tokenizer.from_pretrained(tmp_path)
    BOS, EOT_TEXT, SH, EH, EOM, EOT = 261, 262, 267, 268, 269, 270
    assert tok.vocab_size == 261 + 256 and tok.stop_ids == (EOT, EOT_TEXT, EOM)
    assert tok.encode("user hi") == [259, 32, 260] and tok.encode("hi") == [260]
    assert tok.encode("<|eot_id|>", allow_special=True) == [EOT]
    assert tok.encode("<|eot_id|>") == list(b"<|eot_id|>")
    assistant = list(b"assistant")
    assert tok.render([{"role": "user", "content": "hi"}]) == \
        [BOS, SH, 259, EH, 256, 260, EOT, SH, *assistant, EH, 256]
    assert tok.render_followup([{"role": "user", "content": "hi"}]) == [SH, 259, EH, 256, 260, EOT, SH, *assistant, EH, 256]
    assert tok.decode([BOS, 260, EOT]) == "<|begin_of_text|>hi<|eot_id|>"


# ---------------------------------------------------------------------------- byte level, saving, errors
def test_byte_level(tmp_path):
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 259 and tok.stop_ids == (258, 256) and tok.eot_id == 258 and tok.bos_id is None
    for s in HAND_WRITTEN:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s
    assert tok.encode("a<|im_end|>", allow_special=True) == [97, 258]
    assert tok.render([{"role": "user", "content": "2+2"}]) == \
        [257, *b"user\n", *b"2+2", 258, 10, 257, *b"assistant\n"]
    assert tok.decode([104, 105, 300, -1]) == "hi\ufffd\ufffd"  # ids past the vocabulary: visible, no crash
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # broken UTF-8
    tok.save_pretrained(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path).encode("héllo") == tok.encode("héllo")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)  # the HF copy, for an exported demo model
    for s in HAND_WRITTEN:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s, allow_special=True), s
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+2?"}]
    assert hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == tok.render(msgs)


def test_save_pretrained_round_trip(hf_dir, llama_dir, tmp_path):
    for src in (hf_dir, llama_dir):
        tok = Tokenizer.from_pretrained(src)
        out = tmp_path / src.name
        tok.save_pretrained(out)
        assert sorted(os.listdir(out)) == sorted(os.listdir(src))
        again = Tokenizer.from_pretrained(out)
        s = "Round trip: 数学 😀 <|im_end|> <|eot_id|>"
        assert again.encode(s, allow_special=True) == tok.encode(s, allow_special=True)
        assert again.render([{"role": "user", "content": s}]) == tok.render([{"role": "user", "content": s}])


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # sentencepiece
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_pretrained(tmp_path)
    ranks = [bytes([b]) for b in range(256)]
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(b).decode()} {i % 255}\n"
                                                      for i, b in enumerate(ranks)))
    with pytest.raises(ValueError, match="tokenizer.model: some token ids appear twice"):
        Tokenizer.from_pretrained(tmp_path)


def test_layout_closes_every_attempt_in_the_chat_format(hf_dir, llama_dir):
    """sample.layout puts exactly one end-of-turn token between an attempt and the instruction, whatever
    ended the attempt: against the tokenizer's own render of the whole conversation (an attempt that ended
    with the end of turn, or was cut) and against the by-hand layout (one that stopped on another stop token,
    <|endoftext|> in ChatML, <|end_of_text|> or <|eom_id|> in Llama 3)."""
    from sample import layout
    msgs = [{"role": "user", "content": "Problem: 1 + 1?"}]
    more = [{"role": "user", "content": "There might be an error. Correct it."}]
    for tok in (Tokenizer.from_pretrained(hf_dir), Tokenizer.from_pretrained(llama_dir), Tokenizer.byte_level()):
        x, f, y2 = tok.render(msgs), tok.render_followup(more), tok.encode("3")
        content = tok.encode("The answer is 2.")
        whole = tok.render(msgs + [{"role": "assistant", "content": "The answer is 2."}] + more)
        for y1 in (content + [tok.eot_id], content):  # stopped on the end of turn; cut at max_new_tokens
            seq, spans = layout(x, [y1, y2], f, tok.eot_id)
            assert seq[:spans[1][0]] == whole and seq[spans[1][0]:] == y2
            assert spans == [(len(x), len(x) + len(y1)), (len(whole), len(whole) + len(y2))]
        others = [s for s in tok.stop_ids if s != tok.eot_id]
        assert others, tok.chat_format
        for stop in others:
            seq, spans = layout(x, [content + [stop], y2], f, tok.eot_id)
            assert seq == x + content + [stop, tok.eot_id] + f + y2


def test_byte_level_with_words(tmp_path):
    """The demo's tokenizer with merged words and phrases: each word is one token, any text still
    round-trips, and transformers reads the saved copy and splits every text the same way."""
    words = ["user", "assistant", " might", " mig", " 12", " 1", "There", ("user", "\n"),
             ("There", " might", " ", "b", "e", "?", "\n", " 12", "[", "]", "-", "^", "\\", "x")]
    tok = Tokenizer.byte_level(words)
    spelled = {w[:i] for w in words if isinstance(w, str) for i in range(2, len(w) + 1)}
    phrase = "There might be?\n 12[]-^\\x"
    assert tok.vocab_size == 259 + len(spelled) + 1 + 13  # "user\n", then one merge per part after the first
    for w in words:
        assert len(tok.encode("".join(w))) == 1 and tok.decode(tok.encode("".join(w))) == "".join(w)
    u, a = tok.encode("user\n")[0], tok.encode("assistant")[0]
    assert tok.render([{"role": "user", "content": "x"}]) == [257, u, 120, 258, 10, 257, a, 10]
    assert tok.encode("There might be") == [tok.encode("There")[0], tok.encode(" might")[0], 32, 98, 101]
    assert tok.encode(phrase + phrase + " 12") == [tok.encode(phrase)[0]] * 2 + [tok.encode(" 12")[0]]
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.words == words and again.vocab_size == tok.vocab_size
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for s in HAND_WRITTEN + ["There might be 12 or 1 12x mighty", "sum 12: 3 5 7 1 9", "a" + phrase + phrase + "user\n"]:
        ids = tok.encode(s, allow_special=True)
        assert tok.decode(ids) == s and again.encode(s, allow_special=True) == ids
        assert hf.encode(s, add_special_tokens=False) == ids, s
    with pytest.raises(ValueError, match="neither one byte nor an earlier word"):
        Tokenizer.byte_level(["user", ("user", "ab")])


def test_demo_tokenizer():
    """The demo's tokenizer spells its p1 and each chat header as one token, so a p1 turn is 9 tokens."""
    tok = Tokenizer.byte_level(data.DEMO_WORDS)
    assert len(tok.encode(data.DEMO_P1)) == 1 and tok.decode(tok.encode(data.DEMO_P1)) == data.DEMO_P1
    follow = tok.render_followup([{"role": "user", "content": data.DEMO_P1}])
    assert tok.decode(follow) == "\n<|im_start|>user\n" + data.DEMO_P1 + "<|im_end|>\n<|im_start|>assistant\n"
    assert len(follow) == 8
