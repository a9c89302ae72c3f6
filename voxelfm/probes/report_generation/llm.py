"""Report probe on a pretrained causal language model, adapted with LoRA.

Any causal LM saved on local disk (``save_pretrained`` folder: config, weights, tokenizer) is
loaded with ``transformers`` (``local_files_only``: nothing is ever downloaded) and frozen;
LoRA adapters (``peft``) on its attention are trained together with the attentional projector
that turns the frozen visual inputs into ``n_visual_tokens`` embeddings of the LM's width. The
LM reads ``[visual tokens] [BOS] report [EOS]`` as ``inputs_embeds`` and is trained with
next-token cross-entropy on the report tokens only; the epoch of lowest validation loss is
kept. Generation is the shared greedy / beam search (``decoding``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from voxelfm.errors import InputError, VoxelFMError
from voxelfm.probes.report_generation.decoding import decode
from voxelfm.probes.report_generation.projector import VisualProjector
from voxelfm.probes.report_generation.training import train_on_val_loss

IGNORE = -100


@dataclass(frozen=True)
class LLMSettings:
    """LoRA, optimisation and decoding settings of the LLM probe."""

    llm_path: str
    n_visual_tokens: int = 8
    n_heads: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_epochs: int = 10
    patience: int = 3
    batch_size: int = 4
    max_length: int = 256
    beam_size: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int | None = None
    device: str = "cpu"


def load_causal_lm(path: str | os.PathLike):
    """(model, tokenizer) from a local ``save_pretrained`` folder; one-line error otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(
            path, "options.llm_path is not a folder (a causal language model saved locally)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(path, f"cannot load a causal language model: {error}") from None
    if tokenizer.eos_token_id is None:
        raise InputError(path, "the language model's tokenizer has no EOS token")
    return model, tokenizer


class VisualPrefixLM(nn.Module):
    """The LoRA-adapted LM with a visual prefix: (B, T, D) inputs + ids -> logits."""

    def __init__(self, language_model: nn.Module, projector: VisualProjector):
        super().__init__()
        self.language_model = language_model
        self.projector = projector

    def prefix(self, inputs: torch.Tensor) -> torch.Tensor:
        embeddings = self.language_model.get_input_embeddings()
        return self.projector(inputs).to(embeddings.weight.dtype)  # (B, K, H)

    def logits(
        self, prefix: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, K, H) visual prefix, (B, L) ids -> (B, K + L, V) logits."""
        embedded = self.language_model.get_input_embeddings()(tokens)  # (B, L, H)
        inputs_embeds = torch.cat([prefix, embedded], dim=1)
        if attention_mask is not None:
            visible = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=prefix.device)
            attention_mask = torch.cat([visible, attention_mask], dim=1)
        output = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return output.logits


@dataclass
class LLMProbe:
    """A fitted LLM probe: ``generate(inputs) -> reports``."""

    network: VisualPrefixLM
    tokenizer: Any
    settings: LLMSettings
    bos_id: int
    max_new_tokens: int
    validation_loss: float
    best_epoch: int
    device: torch.device

    name = "llm"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        settings = {k: v for k, v in vars(self.settings).items() if k != "device"}
        return {**settings, "max_new_tokens": self.max_new_tokens, "epochs": self.best_epoch}

    @torch.no_grad()
    def generate(self, inputs: np.ndarray, *, beam_size: int | None = None) -> list[str]:
        """Reports for (n, T, D) visual inputs (deterministic)."""
        self.network.eval()
        inputs_t = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=self.device)
        prefix = torch.cat([self.network.prefix(chunk) for chunk in inputs_t.split(32)])

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            logits = self.network.logits(prefix[rows.to(self.device)], tokens.to(self.device), None)
            return logits[:, -1].float().log_softmax(dim=-1).cpu()

        beams = beam_size or self.settings.beam_size
        ids = decode(
            step,
            len(inputs_t),
            bos_id=self.bos_id,
            eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=self.max_new_tokens,
            beam_size=beams,
            length_penalty=self.settings.length_penalty,
            batch_size=max(1, 16 // beams),
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def fit_llm(
    inputs_train: np.ndarray,
    reports_train: Sequence[str],
    inputs_val: np.ndarray,
    reports_val: Sequence[str],
    *,
    settings: LLMSettings,
    seed: int = 0,
) -> LLMProbe:
    """Train LoRA adapters and the visual projector on train; keep the best val-loss epoch.

    Args:
        inputs_train, inputs_val: (n, T, D) frozen visual inputs.
        settings: ``llm_path`` names the local model folder.
    """
    from peft import LoraConfig, get_peft_model

    device = torch.device(settings.device)
    language_model, tokenizer = load_causal_lm(settings.llm_path)
    eos_id = int(tokenizer.eos_token_id)
    bos_id = int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id)
    # The visual prefix and the report share the LM's positions.
    max_length = settings.max_length
    positions = getattr(language_model.config, "max_position_embeddings", None)
    if positions:
        max_length = min(max_length, int(positions) - settings.n_visual_tokens)
    if max_length < 4:
        raise VoxelFMError(
            f"{settings.llm_path}: the model has {positions} positions, too few for "
            f"{settings.n_visual_tokens} visual tokens and a report"
        )
    train_sequences = _sequences(tokenizer, reports_train, bos_id, eos_id, max_length)
    val_sequences = _sequences(tokenizer, reports_val, bos_id, eos_id, max_length)
    longest = max(len(s) for s in train_sequences) - 1
    max_new_tokens = min(settings.max_new_tokens or longest + 16, max_length - 1)
    inputs_train = np.ascontiguousarray(inputs_train, dtype=np.float32)
    inputs_val = np.ascontiguousarray(inputs_val, dtype=np.float32)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=list(settings.lora_target_modules or []) or None,
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():
                # GPT-2 style Conv1D layers: peft switches fan_in_fan_out on by itself.
                warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
                adapted = get_peft_model(language_model, lora)
        except ValueError as error:
            raise VoxelFMError(
                f"cannot add LoRA adapters to {settings.llm_path}: {' '.join(str(error).split())}"
                "; set options.lora_target_modules"
            ) from None
        width = language_model.get_input_embeddings().embedding_dim
        n_heads = settings.n_heads if width % settings.n_heads == 0 else 1
        projector = VisualProjector(
            inputs_train.shape[2], inputs_train.shape[1], width, settings.n_visual_tokens, n_heads
        )
        network = VisualPrefixLM(adapted, projector).to(device)
        train_x = torch.from_numpy(inputs_train).to(device)
        val_x = torch.from_numpy(inputs_val).to(device)
        n_visual = settings.n_visual_tokens

        def loss_of(x: torch.Tensor, sequences: list[np.ndarray]) -> tuple[torch.Tensor, int]:
            tokens, mask = _pad(sequences, eos_id)
            tokens, mask = tokens.to(device), mask.to(device)
            logits = network.logits(network.prefix(x), tokens, mask)[:, n_visual:]  # (B, L, V)
            targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=IGNORE,
            )
            return loss, int((targets != IGNORE).sum())

        def batch_loss(rows: np.ndarray) -> torch.Tensor:
            return loss_of(train_x[rows], [train_sequences[i] for i in rows])[0]

        def val_loss() -> float:
            total, count = 0.0, 0
            for start in range(0, len(val_sequences), settings.batch_size):
                stop = start + settings.batch_size
                loss, n_tokens = loss_of(val_x[start:stop], val_sequences[start:stop])
                total, count = total + float(loss) * n_tokens, count + n_tokens
            return total / max(count, 1)

        result = train_on_val_loss(
            network,
            batch_loss,
            val_loss,
            len(train_sequences),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            max_epochs=settings.max_epochs,
            patience=settings.patience,
            batch_size=settings.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
    return LLMProbe(
        network,
        tokenizer,
        settings,
        bos_id,
        max_new_tokens,
        result.best_val_loss,
        result.best_epoch,
        device,
    )


def _sequences(tokenizer, texts, bos_id: int, eos_id: int, max_length: int) -> list[np.ndarray]:
    out = []
    for text in texts:
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"][: max_length - 2]
        out.append(np.array([bos_id, *ids, eos_id], dtype=np.int64))
    return out


def _pad(sequences: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids right-padded with ``pad_id`` and the (B, L) 0/1 attention mask."""
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        tokens[i, : len(sequence)] = torch.as_tensor(sequence)
        mask[i, : len(sequence)] = 1
    return tokens, mask
