"""DALL-E's text tokens: CLIP's BPE cut to a smaller vocabulary, one pad token per position.

The paper encodes captions with a 16384-token BPE vocabulary. We reuse the byte-level BPE that
ships inside open_clip (no download) and keep only its first ``vocab_size - 514`` merges: a BPE
vocabulary is its merge list in the order the merges were learned, so the first n merges are
exactly the tokenizer BPE training would have produced with n merges. Ids: 512 byte tokens, the
merges, then start-of-text and end-of-text, ``vocab_size`` in all; rarer words split into more
pieces instead of mapping to an unknown token.

Sequences: ``[start, tokens..., end]`` cut to ``text_len`` (the end token is kept), then pads:
the pad at position j is id ``vocab_size + j`` (the paper's per-position padding tokens).
"""

from __future__ import annotations

import functools
import gzip
import os
import tempfile
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe

BYTE_TOKENS = 512  # 256 bytes, alone and word-final
SPECIAL_TOKENS = 2  # start-of-text, end-of-text


@functools.cache
def _truncated_bpe(merges: int) -> Path:
    """A copy of open_clip's merge file with only its first ``merges`` merges."""
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    path = Path(tempfile.gettempdir()) / f"mmpipe-bpe-{merges}-{os.getuid()}.txt.gz"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(gzip.compress("\n".join(lines[: merges + 1]).encode("utf-8")))
        tmp.replace(path)  # atomic: several workers may write it at once
    return path


class DalleTokenizer:
    """``tokenizer(list_of_captions) -> [B, text_len]`` int64, pads per position."""

    def __init__(self, vocab_size: int, text_len: int):
        merges = vocab_size - BYTE_TOKENS - SPECIAL_TOKENS
        if merges < 0:
            raise ValueError(f"vocab_size must be at least {BYTE_TOKENS + SPECIAL_TOKENS}")
        self.bpe = SimpleTokenizer(bpe_path=str(_truncated_bpe(merges)), context_length=text_len)
        if self.bpe.vocab_size != vocab_size:
            raise ValueError(f"open_clip's BPE has fewer than {vocab_size} tokens")
        self.vocab_size, self.text_len = vocab_size, text_len

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.arange(self.text_len).repeat(len(texts), 1) + self.vocab_size  # all pads
        for i, text in enumerate(texts):
            ids = [self.bpe.sot_token_id, *self.bpe.encode(text)][: self.text_len - 1]
            ids.append(self.bpe.eot_token_id)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens: torch.Tensor) -> str:
        ids = [int(t) for t in tokens if int(t) < self.vocab_size]
        specials = {self.bpe.sot_token_id, self.bpe.eot_token_id}
        return self.bpe.decode([i for i in ids if i not in specials]).strip()
