"""Tokenizer: a Hugging Face `tokenizer.json` (the `tokenizers` library) plus tokenizer_config.json.

The engine works on token ids; a tokenizer is needed only for stop strings and by the API edge
(text prompts, chat templates, detokenized output). Files come from a local model folder, never
from a hub.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from collections.abc import Sequence


ROLE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # random-weight models' chat default


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    def __init__(self, backend, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 chat_template: str | None = None) -> None:
        self._backend = backend  # a tokenizers.Tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template  # Jinja source from tokenizer_config.json, if any

    @classmethod
    def from_folder(cls, path: str | pathlib.Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend  # lazy: only folders with a tokenizer need it

        folder = pathlib.Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json (only the fast-tokenizer format is supported)")
        backend = Backend.from_file(str(file))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # {"content": "</s>", ...}
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        return cls(backend, token_id("eos_token"), token_id("bos_token"), _chat_template(folder, config))

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A tokenizer that needs no files: ids 0-2 are <pad>, <s>, </s>, then one id per byte.

        For random-weight models (tests, the demo), so text in and text out work end to end.
        """
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

        specials = ["<pad>", "<s>", "</s>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(specials)
        return cls(backend, eos_token_id=2, bos_token_id=1)

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens (`<0x00>` .. `<0xFF>`, as SentencePiece vocabularies have)."""
        return frozenset(i for token, i in self._backend.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """The text of a growing list of token ids, a new piece per `push`, the pieces adding up to
    `tokenizer.decode(all ids)`. It decodes only a window of the last tokens (vLLM's prefix and read
    offsets), so a long stream costs the same per token at its end as at its start: the window starts
    at the last piece's first token, whose decoding the new text is measured against, so a decoder
    that treats a call's first token specially (a stripped leading space) does so on both sides.
    A piece that would end in an incomplete character (U+FFFD) waits for the next token, and so does
    one that ends in a byte-fallback token (`<0xE3>`): such a decoder renders a run of byte tokens as
    one group, all of it U+FFFD if invalid, so a later byte can change how the earlier ones print."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_tokens = tokenizer.byte_token_ids
        self.ids: list[int] = []
        self._prefix = self._read = 0  # the window starts at _prefix; text up to _read is sent

    def push(self, new_ids: Sequence[int], final: bool = False) -> str:
        """The text `new_ids` add; with `final`, whatever is held back too."""
        self.ids += new_ids
        decode = self._tokenizer.decode
        sent = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if len(text) <= len(sent) or not final and (text.endswith("\ufffd") or self.ids[-1] in self._byte_tokens):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(sent):]


def _chat_template(folder: pathlib.Path, config: dict) -> str | None:
    """The folder's chat template, where Hugging Face looks: chat_template.jinja (how transformers
    saves templates since 2024), else tokenizer_config.json's `chat_template`, a string or a list of
    named templates (then the one named "default", or the only one)."""
    file = folder / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or (next(iter(named.values())) if len(named) == 1 else None)
    return template if isinstance(template, str) else None
