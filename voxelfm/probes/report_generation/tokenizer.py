"""Word-level tokenizer of radiology reports, learned from the training split's reports only.

Built with the ``tokenizers`` library: NFKC + lower-casing, then words and each run of
punctuation split apart (``Whitespace``: ``\\w+|[^\\w\\s]+``) and numbers split into single
digits, so a size never seen in training ("37 mm") is still spelled out of known tokens. The
ten digits are always in the vocabulary for the same reason; every other word comes from the
training reports, and a word not among them becomes ``<unk>``.

Special tokens (fixed ids): ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3. The tokenizer is
saved as the ``tokenizers`` JSON (``tokenizer.json``) beside the probe.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.utils.atomic import atomic_write_text

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
_DIGITS = " ".join("0123456789")


class ReportTokenizer:
    """Text <-> token ids of the report decoder (wraps a ``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise VoxelFMError(f"tokenizer special tokens must be {SPECIAL_TOKENS} with ids 0..3")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = ids

    @classmethod
    def train(cls, reports: Iterable[str]) -> ReportTokenizer:
        """Learn the vocabulary from ``reports`` (pass the training split only)."""
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
        )
        trainer = trainers.WordLevelTrainer(
            special_tokens=list(SPECIAL_TOKENS), min_frequency=1, show_progress=False
        )
        texts = [str(report) for report in reports]
        if not texts:
            raise VoxelFMError("cannot learn a report tokenizer without training reports")
        tokenizer.train_from_iterator([*texts, _DIGITS], trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReportTokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # noqa: BLE001 - tokenizers raises its own exception types
            raise InputError(path, f"cannot read the report tokenizer: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, self._tokenizer.to_str(pretty=True))
        return Path(path)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS / EOS."""
        return self._tokenizer.encode(str(text), add_special_tokens=False).ids

    def sequences(self, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
        """``[BOS, ids..., EOS]`` per text, truncated to ``max_length`` ids (EOS kept last)."""
        out = []
        for text in texts:
            ids = self.encode(text)[: max_length - 2]
            out.append(np.array([self.bos_id, *ids, self.eos_id], dtype=np.int64))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Readable text of generated ids: stops at EOS, drops special tokens, rejoins digits
        and punctuation ("2 1 mm ." -> "21 mm.") and capitalises sentences."""
        tokens = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == self.eos_id:
                break
            if token_id in (self.pad_id, self.bos_id):
                continue
            tokens.append(self._tokenizer.id_to_token(token_id) or UNK)
        return detokenize(tokens)


def detokenize(tokens: Sequence[str]) -> str:
    """Join word-level tokens into text as the synthetic reports are written."""
    text = " ".join(tokens)
    text = re.sub(r"(?<=\d) (?=\d)", "", text)  # digits of one number
    text = re.sub(r" (?=[.,:;)?!])", "", text)  # no space before closing punctuation
    text = re.sub(r"(?<=\() ", "", text)
    text = re.sub(r" ?- ?", "-", text)  # "low - attenuation" -> "low-attenuation"
    # Capitalise the first letter of the text and of every sentence or section.
    return re.sub(r"(^|[.:!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
