"""
The tokenizer: a thin wrapper over a tiktoken.Encoding built from the model's own files, its
special tokens, and the two chat formats written out by hand (ChatML for Qwen, Llama 3's headers).

Files read by Tokenizer.from_pretrained(dir), first match wins:
  byte_tokenizer.json          the demo's byte-level tokenizer (ids 0..255 are bytes, then ChatML tokens,
                               then whole words built by merges)
  tokenizer.model              Llama 3: tiktoken's own format, "base64(token) rank" per line
  tokenizer.json               Hugging Face byte-level BPE (Qwen2/2.5/3, Llama 3 in HF layout)
  vocab.json + merges.txt      the same BPE in the older two-file layout (Qwen2's pattern and NFC,
                               as transformers' Qwen2Tokenizer)
Special tokens come from tokenizer.json's added_tokens or tokenizer_config.json's
added_tokens_decoder; a bare tokenizer.model gets Llama 3.1's 256 special tokens.

Hugging Face BPE merges pairs in the order of merges.txt; tiktoken merges by the rank of the
merged token. The two agree when token ids follow merge order, which holds for Qwen, Llama 3
and GPT-2 and is checked on load (a file that breaks it is refused, not mis-tokenized).

The chat format is chosen by the special tokens present: <|im_start|>/<|im_end|> -> ChatML,
<|start_header_id|>/<|eot_id|> -> Llama 3. Two deliberate differences from the HF chat templates:
  - no system message is inserted when none is given (Qwen2.5's template inserts "You are Qwen,
    created by Alibaba Cloud. You are a helpful assistant.", Llama 3.1's a knowledge-cutoff date):
    pass a system message to get one;
  - each message's content is tokenized on its own, as the sampler produces it (tokens of the
    template's text never merge with the content's). HF tokenizes the rendered string at once,
    which gives other ids only when a content starts with a line break (or whitespace then one).
This file imports only tiktoken and the standard library.
"""
import base64
import json
import os
import re
import shutil
import unicodedata

import tiktoken

# Qwen2's pre-tokenizer (tokenizer.json's Split regex); Llama 3 differs only in \p{N}{1,3}
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3.1's special tokens, ids len(ranks) + i, used when only tokenizer.model is there
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]

CHATML_SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}  # the byte-level tokenizer's
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def bytes_to_unicode():
    """GPT-2's table: each byte -> a printable unicode character (how byte-level BPE files spell tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control characters, space, etc. move to 256 + n
            table[b] = chr(256 + n)
            n += 1
    return table


# ---------------------------------------------------------------------------- reading the files
def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer file: {e}") from None


def _read_tiktoken_ranks(path):
    """tokenizer.model in tiktoken's format: one "base64(token) rank" line per token."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {n}: not a tiktoken ranks file ('base64 rank' per line); "
                                 "sentencepiece tokenizer.model files (Llama 2, Mistral) are not supported") from None
    return ranks


def _bpe_ranks(vocab, merges, added_ids, where):
    """Byte-level BPE vocabulary {unicode-mapped string: id} -> tiktoken ranks {bytes: id}, checking that
    ids follow merge order (tiktoken merges by rank, HF in merge order). Added tokens are left out."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in vocab.items():
        if i in added_ids:
            continue
        try:
            ranks[bytes(byte_of[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"{where}: vocabulary entry {token!r} is not byte-level BPE "
                             "(a character outside GPT-2's byte table)") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: vocabulary lacks single bytes {missing[:10]}: not a byte-level BPE")
    prev = -1
    for n, m in enumerate(merges):
        a, b = m.split(" ") if isinstance(m, str) else m
        a, b = bytes(byte_of[c] for c in a), bytes(byte_of[c] for c in b)
        r = ranks.get(a + b)
        if r is None:
            raise ValueError(f"{where}: merge {n} {m!r} makes a token that is not in the vocabulary")
        if r < prev:  # equal is fine: converted tiktoken files list every split of a token
            raise ValueError(f"{where}: merge {n} {m!r} breaks the assumption that token ids follow merge order "
                             f"(merged id {r} after id {prev}); tiktoken would tokenize differently")
        prev = r
    return ranks


def _added_tokens(ckpt_dir):
    """{content: id} of the added/special tokens from tokenizer.json or tokenizer_config.json (or None)."""
    tj, tc = os.path.join(ckpt_dir, "tokenizer.json"), os.path.join(ckpt_dir, "tokenizer_config.json")
    if os.path.exists(tj):
        entries, where = _read_json(tj).get("added_tokens") or [], tj
    elif os.path.exists(tc):
        decoder = _read_json(tc).get("added_tokens_decoder") or {}
        entries, where = [dict(v, id=int(k)) for k, v in decoder.items()], tc
    else:
        return None
    for e in entries:
        if e.get("lstrip") or e.get("rstrip") or e.get("single_word"):
            raise ValueError(f"{where}: added token {e['content']!r} uses lstrip/rstrip/single_word, not supported")
    return {e["content"]: e["id"] for e in entries} or None


def _hf_pattern_and_nfc(tok, where):
    """The pre-tokenizer regex and whether NFC applies, from tokenizer.json; refuse what tiktoken cannot do."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ValueError(f"{where}: model is not a plain byte-level BPE (type {model.get('type')})")
    norm = tok.get("normalizer")
    norms = [] if norm is None else norm.get("normalizers", [norm]) if norm["type"] == "Sequence" else [norm]
    if any(n["type"] != "NFC" for n in norms):
        raise ValueError(f"{where}: normalizer {[n['type'] for n in norms]} not supported (only NFC)")
    pre = tok.get("pre_tokenizer")
    pres = [] if pre is None else pre.get("pretokenizers", [pre]) if pre["type"] == "Sequence" else [pre]
    kinds = [p["type"] for p in pres]
    if kinds == ["Split", "ByteLevel"] and not pres[1].get("use_regex", True) and not pres[1].get("add_prefix_space"):
        split = pres[0]
        if "Regex" not in split["pattern"] or split.get("behavior") != "Isolated" or split.get("invert"):
            raise ValueError(f"{where}: pre_tokenizer Split must be an Isolated, non-inverted Regex")
        pattern = split["pattern"]["Regex"]
    elif kinds == ["ByteLevel"] and pres[0].get("use_regex", True) and not pres[0].get("add_prefix_space"):
        pattern = GPT2_PATTERN
    else:
        raise ValueError(f"{where}: pre_tokenizer {kinds} not supported "
                         "(expected Split(regex) + ByteLevel(use_regex=false), or ByteLevel alone)")
    return pattern, bool(norms)


def _word_merges(words):
    """Merges that build each word, in the order their results first appear, so that token ids follow
    merge order (ids from 259). A str is built byte by byte, left to right; a tuple of parts (each one
    byte or an earlier word) part by part, so that a phrase the pattern would split becomes one token."""
    merges, seen = [], set()
    for w in words:
        parts = [bytes([x]) for x in w.encode("utf-8")] if isinstance(w, str) else [p.encode("utf-8") for p in w]
        for p in parts:
            if len(p) != 1 and p not in seen:
                raise ValueError(f"word {w!r}: its part {p.decode()!r} is neither one byte nor an earlier word")
        built = parts[0]
        for p in parts[1:]:
            if built + p not in seen:
                seen.add(built + p)
                merges.append((built, p))
            built += p
    return merges


def _word_pattern(words):
    """The demo tokenizer's pre-tokenizer: GPT-2's, after an alternative that keeps each phrase (a tuple
    word) one piece. Letters, digits and spaces stand for themselves; anything else is escaped in a form
    tiktoken's regex and transformers' Oniguruma read alike."""
    def lit(c):
        if c.isalnum() or c == " ":
            return c
        return r"\n" if c == "\n" else "\\" + c if c in "\\]^-[" else f"[{c}]"
    phrases = sorted({"".join(w) for w in words if not isinstance(w, str)}, key=len, reverse=True)
    if not phrases:
        return GPT2_PATTERN
    return "(?:" + "|".join("".join(map(lit, p)) for p in phrases) + ")|" + GPT2_PATTERN


def _write_hf_byte_level(out_dir, special, words=()):
    """The byte-level tokenizer in HF layout too (a BPE whose merges build the words), so transformers
    and vLLM load a byte-level model that convert.py --to-hf exports (the demo's own base cannot be: it is a
    qwen2 without the q/k/v biases that HF's Qwen2 always has). from_pretrained reads byte_tokenizer.json first."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": bool(words)}
    pre = byte_level
    if any(not isinstance(w, str) for w in words):  # phrases: the pattern goes in a Split before ByteLevel
        split = {"type": "Split", "pattern": {"Regex": _word_pattern(words)}, "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    u = bytes_to_unicode()
    spell = lambda b: "".join(u[x] for x in b)
    merges = _word_merges(words)
    vocab = {c: b for b, c in u.items()}
    vocab.update(special)  # listed in the vocabulary too: transformers would renumber added tokens inside it
    vocab.update({spell(a + b): 256 + len(special) + i for i, (a, b) in enumerate(merges)})
    tok = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
           "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for s, i in special.items()],
           "pre_tokenizer": pre, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab, "merges": [f"{spell(a)} {spell(b)}" for a, b in merges]}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": CHATML_TEMPLATE}
    for name, obj in (("tokenizer.json", tok), ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    def __init__(self, name, pattern, ranks, special, nfc=False, files=()):
        ids = [*ranks.values(), *special.values()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: some token ids appear twice (in the ranks or the special tokens)")
        try:
            self.enc = tiktoken.Encoding(str(name), pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        except ValueError as e:
            raise ValueError(f"{name}: tiktoken cannot use the pre-tokenizer pattern {pattern!r}: {e}") from None
        self.special = dict(special)  # {string: id}
        self.nfc = nfc                # NFC-normalize text before encoding (Qwen's tokenizer.json says so)
        self.files = list(files)      # source files that save_pretrained copies; empty: the byte-level one
        self.words = []               # the byte-level tokenizer's merged words
        self._special_re = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
        sid = special.get
        if sid("<|im_start|>") is not None and sid("<|im_end|>") is not None:
            self.chat_format, self.eot_id, self.bos_id = "chatml", sid("<|im_end|>"), None
            stops = [self.eot_id, sid("<|endoftext|>")]
        elif sid("<|start_header_id|>") is not None and sid("<|eot_id|>") is not None:
            self.chat_format, self.eot_id, self.bos_id = "llama3", sid("<|eot_id|>"), sid("<|begin_of_text|>")
            stops = [self.eot_id, sid("<|end_of_text|>"), sid("<|eom_id|>")]
        else:
            raise ValueError(f"{name}: no chat special tokens (<|im_start|>/<|im_end|> for ChatML, "
                             "<|start_header_id|>/<|eot_id|> for Llama 3)")
        self.stop_ids = tuple(i for i in stops if i is not None)
        self.vocab_size = self.enc.n_vocab

    @classmethod
    def from_pretrained(cls, ckpt_dir):
        path = lambda name: os.path.join(ckpt_dir, name)
        has = lambda name: os.path.exists(path(name))
        copy = [path(n) for n in HF_TOKENIZER_FILES if has(n)]
        if has("byte_tokenizer.json"):
            spec = _read_json(path("byte_tokenizer.json"))
            if spec.get("format") != "byte_level" or spec.get("special_tokens") != CHATML_SPECIALS:
                raise ValueError(f"{path('byte_tokenizer.json')}: not this project's byte-level tokenizer")
            return cls.byte_level(spec.get("words", ()))
        if not (has("tokenizer.model") or has("tokenizer.json") or has("vocab.json") and has("merges.txt")):
            raise FileNotFoundError(f"{ckpt_dir}: no tokenizer files (byte_tokenizer.json, tokenizer.model, "
                                    "tokenizer.json, or vocab.json + merges.txt)")
        added = _added_tokens(ckpt_dir)
        if has("tokenizer.model"):
            ranks = _read_tiktoken_ranks(path("tokenizer.model"))
            if added is None:
                added = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
            added_ids = set(added.values())
            ranks = {b: i for b, i in ranks.items() if i not in added_ids}
            return cls(path("tokenizer.model"), LLAMA3_PATTERN, ranks, added, nfc=False, files=copy)
        if added is None:
            raise ValueError(f"{ckpt_dir}: no special tokens (tokenizer.json added_tokens or "
                             "tokenizer_config.json added_tokens_decoder)")
        if has("tokenizer.json"):
            tok = _read_json(path("tokenizer.json"))
            pattern, nfc = _hf_pattern_and_nfc(tok, path("tokenizer.json"))
            vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
            ranks = _bpe_ranks(vocab, merges, set(added.values()), path("tokenizer.json"))
            return cls(path("tokenizer.json"), pattern, ranks, added, nfc=nfc, files=copy)
        vocab = _read_json(path("vocab.json"))
        with open(path("merges.txt"), encoding="utf-8") as f:
            merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
        ranks = _bpe_ranks(vocab, merges, set(added.values()), path("merges.txt"))
        return cls(path("vocab.json"), QWEN2_PATTERN, ranks, added, nfc=True, files=copy)  # as Qwen2Tokenizer does

    @classmethod
    def byte_level(cls, words=()):
        """The demo's tokenizer: ids 0..255 are bytes, 256..258 are ChatML's tokens. Without words there
        are no merges, so any split of the text gives the same ids and the pattern only bounds the piece
        length. `words` (e.g. the chat roles, the words of p1, " 12") become single tokens, ids 259 on,
        through merges that build each one byte by byte; the text is then split as GPT-2 splits it. A
        tuple of earlier words and bytes (("user", "\n"), p1's words and stops) is a phrase: one token
        too, kept one piece by the pattern wherever it occurs."""
        words = list(dict.fromkeys(w if isinstance(w, str) else tuple(w) for w in words))
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in _word_merges(words):
            ranks[a + b] = 256 + len(CHATML_SPECIALS) + len(ranks) - 256
        tok = cls("byte_level", _word_pattern(words) if words else r"(?s:.{1,256})", ranks, CHATML_SPECIALS)
        for w in words:
            if len(tok.encode("".join(w))) != 1:
                raise ValueError(f"word {w!r} does not encode as one token (an earlier word's merges split it)")
        tok.words = words
        return tok

    def same_as(self, other):
        """Whether two tokenizers give every text the same ids: the same ranks, pre-tokenizer, special tokens."""
        key = lambda t: (t.enc._mergeable_ranks, t.enc._pat_str, t.special, t.nfc)
        return key(self) == key(other)

    def save_pretrained(self, out_dir):
        """Write the tokenizer into a checkpoint dir so from_pretrained reads it back."""
        os.makedirs(out_dir, exist_ok=True)
        if not self.files:
            spec = {"format": "byte_level", "special_tokens": self.special}
            if self.words:
                spec["words"] = self.words
            with open(os.path.join(out_dir, "byte_tokenizer.json"), "w") as f:
                json.dump(spec, f, indent=2)
            _write_hf_byte_level(out_dir, self.special, self.words)
        for src in self.files:
            dst = os.path.join(out_dir, os.path.basename(src))
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copyfile(src, dst)

    # ------------------------------------------------------------------------ text <-> ids
    def encode(self, text, allow_special=False):
        """Ids of `text`, no BOS added. allow_special=True turns special-token strings into their ids
        (as HF does); otherwise they are ordinary text (safe for untrusted content)."""
        if not allow_special:
            return self.enc.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            ids += self.encode(text[start:m.start()]) + [self.special[m.group()]]
            start = m.end()
        return ids + self.encode(text[start:])

    def decode(self, ids):
        """Text of `ids`; broken UTF-8 and ids outside the vocabulary become U+FFFD."""
        ids = [int(i) for i in ids]
        try:
            data = self.enc.decode_bytes(ids)
        except (KeyError, OverflowError):  # an id the tokenizer lacks (models often have rows past the vocabulary)
            data = b"".join(self._token_bytes(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    def _token_bytes(self, i):
        try:
            return self.enc.decode_single_token_bytes(i)
        except (KeyError, OverflowError):
            return "\ufffd".encode()

    # ------------------------------------------------------------------------ chat formats
    def _message(self, m):
        """Ids of one finished message, from its header to its end-of-turn token (and ChatML's newline)."""
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"bad message {m!r}: role must be system/user/assistant, content a str")
        # ChatML:  <|im_start|>{role}\n{content}<|im_end|>\n
        # Llama 3: <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
        tail = self.encode("\n") if self.chat_format == "chatml" else []
        return [*self._header(role), *self.encode(content), self.eot_id, *tail]

    def _header(self, role):
        s = self.special
        if self.chat_format == "chatml":
            return [s["<|im_start|>"], *self.encode(role + "\n")]
        return [s["<|start_header_id|>"], *self.encode(role), s["<|end_header_id|>"], *self.encode("\n\n")]

    def render(self, messages):
        """Ids of a conversation, ending where the assistant speaks next (BOS first for Llama 3)."""
        ids = [self.bos_id] if self.bos_id is not None else []
        for m in messages:
            ids += self._message(m)
        return ids + self._header("assistant")

    def render_followup(self, messages):
        """Ids that follow a finished assistant turn (one that ended with eot_id, as sampled) to add
        `messages` and open the next assistant turn:
        render(msgs) + encode(y) + [eot_id] + render_followup(more) == render(msgs + [assistant y] + more)."""
        ids = self.encode("\n") if self.chat_format == "chatml" else []  # the newline after <|im_end|>
        for m in messages:
            ids += self._message(m)
        return ids + self._header("assistant")
