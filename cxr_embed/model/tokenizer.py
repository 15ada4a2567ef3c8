"""CLIP byte-level BPE tokenizer, reading the model folder's ``clip_tokenizer_4.16.2`` files.

It reproduces the reference (transformers' slow ``CLIPTokenizer`` with ftfy installed, called with
``padding='max_length', max_length=77, truncation=True``) without depending on transformers:
ftfy ``fix_text``, whitespace collapse + strip, lowercase, the CLIP regex split, byte-level BPE with
``</w>`` word ends, BOS first, EOS last (kept at the end when truncating), right padding with the EOS
id, attention mask 1 on BOS, text and EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

from cxr_embed.errors import ConfigError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: 49152 - 256 - 2 merges: the line range transformers reads from merges.txt (after the version line).
N_MERGES = 49152 - 256 - 2

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention masks, both (T, context_length) int64."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class ClipTokenizer:
    """Text -> fixed-length CLIP token ids. Load with :meth:`from_dir` on a tokenizer folder."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int = 77):
        self.encoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = context_length
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.pad_id = self.eos_id
        self._byte_map = bytes_to_unicode()
        self._cache: dict[str, str] = {BOS: BOS, EOS: EOS}

    @classmethod
    def from_dir(cls, folder: str | Path, context_length: int = 77) -> ClipTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` from a ``clip_tokenizer_4.16.2`` folder."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise ConfigError(f"Tokenizer file missing: {f}. The model folder needs "
                                  "language_model/clip_tokenizer_4.16.2/ (run `cxr-embed model pull`).")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").strip().split("\n")[1 : N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if BOS not in vocab or EOS not in vocab or any(len(m) != 2 for m in merges):
            raise ConfigError(f"{folder} does not hold a CLIP tokenizer (vocab.json lacks {BOS}/{EOS} or "
                              "merges.txt is malformed).")
        return cls(vocab, merges, context_length)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def tokenize(self, text: str) -> list[str]:
        """BPE tokens of ``text`` (no BOS/EOS), e.g. ``['ple', 'ural</w>', 'ef', 'fusion</w>']``."""
        text = _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()
        tokens: list[str] = []
        for piece in _SPLIT.findall(text):
            mapped = "".join(self._byte_map[b] for b in piece.encode("utf-8"))
            tokens.extend(self._bpe(mapped).split(" "))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` framed by BOS/EOS, untruncated."""
        unk = self.eos_id  # the tokenizer's unk_token is <|endoftext|>
        return [self.bos_id, *(self.encoder.get(t, unk) for t in self.tokenize(text)), self.eos_id]

    def __call__(self, texts: list[str]) -> TokenBatch:
        """Pad/truncate to ``context_length``; a truncated text still ends with EOS."""
        n = self.context_length
        ids = np.full((len(texts), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), n), dtype=np.int64)
        for row, text in enumerate(texts):
            seq = self.encode(text)
            if len(seq) > n:
                seq = seq[: n - 1] + [self.eos_id]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return TokenBatch(ids, mask)
