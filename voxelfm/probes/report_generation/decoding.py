"""Greedy and beam-search decoding over any next-token model.

A model is seen through one function, ``step(rows, prefix) -> (N, V) log-probabilities of
the next token``, where ``rows`` (N,) says which scan each prefix (N, t) belongs to; the
decoder and the LLM probe both provide one. Decoding has no randomness: the same model and
inputs give the same text. Each prefix is re-run in full at every step (no key-value cache),
which costs nothing at report length for the small probes and keeps one code path for both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def greedy_decode(
    step: StepFn, n: int, *, bos_id: int, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """The most probable next token at every step, until EOS or ``max_new_tokens``.

    Returns the generated ids of each of the ``n`` scans, without BOS and EOS.
    """
    rows = torch.arange(n)
    tokens = torch.full((n, 1), bos_id, dtype=torch.long)
    finished = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_token = step(rows, tokens).argmax(dim=-1)  # (n,)
        next_token[finished] = eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == eos_id
        if finished.all():
            break
    return [_until_eos(row[1:], eos_id) for row in tokens.tolist()]


@torch.no_grad()
def beam_search(
    step: StepFn,
    n: int,
    *,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search: keep the ``beam_size`` prefixes of highest summed log-probability.

    A beam that emitted EOS is frozen (it may only repeat EOS at no cost) and keeps competing
    with its score. At the end each scan's beams are ranked by summed log-probability divided
    by ``length ** length_penalty`` (0: no normalisation; 1: mean per token), so long reports
    are not penalised just for having more tokens. ``beam_size`` 1 is greedy decoding.

    Returns the generated ids of each of the ``n`` scans, without BOS and EOS.
    """
    k = beam_size
    rows = torch.arange(n).repeat_interleave(k)  # (n*k,) scan of each beam
    tokens = torch.full((n * k, 1), bos_id, dtype=torch.long)
    scores = torch.zeros(n, k)
    scores[:, 1:] = -torch.inf  # all beams start equal: expand only the first at step one
    finished = torch.zeros(n * k, dtype=torch.bool)
    lengths = torch.zeros(n * k)
    for _ in range(max_new_tokens):
        log_probs = step(rows, tokens).float()  # (n*k, V)
        vocab = log_probs.shape[-1]
        frozen = torch.full((vocab,), -torch.inf)
        frozen[eos_id] = 0.0
        log_probs = torch.where(finished[:, None], frozen, log_probs)
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(n, k * vocab)
        scores, best = candidates.topk(k, dim=1)  # (n, k)
        source = (torch.arange(n)[:, None] * k + best // vocab).reshape(-1)  # (n*k,)
        next_token = (best % vocab).reshape(-1)
        tokens = torch.cat([tokens[source], next_token[:, None]], dim=1)
        lengths = lengths[source] + (~finished[source]).float()
        finished = finished[source] | (next_token == eos_id)
        if finished.all():
            break
    normalised = scores / lengths.reshape(n, k).clamp(min=1) ** length_penalty
    chosen = torch.arange(n) * k + normalised.argmax(dim=1)
    return [_until_eos(tokens[i, 1:].tolist(), eos_id) for i in chosen.tolist()]


def decode(
    step: StepFn,
    n: int,
    *,
    bos_id: int,
    eos_id: int,
    max_new_tokens: int,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy (``beam_size`` 1) or beam-search ids for ``n`` scans, ``batch_size`` at a time."""
    out: list[list[int]] = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)

        def batch_step(rows: torch.Tensor, prefix: torch.Tensor, start=start) -> torch.Tensor:
            return step(rows + start, prefix)

        settings = {"bos_id": bos_id, "eos_id": eos_id, "max_new_tokens": max_new_tokens}
        if beam_size == 1:
            out += greedy_decode(batch_step, stop - start, **settings)
        else:
            out += beam_search(
                batch_step,
                stop - start,
                beam_size=beam_size,
                length_penalty=length_penalty,
                **settings,
            )
    return out


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
