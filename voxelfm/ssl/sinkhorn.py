"""Sinkhorn-Knopp normalisation of teacher logits (SwAV; the DINOv2 teacher option).

Instead of centring, the teacher's assignments of a batch of B samples to K prototypes are
made doubly stochastic: every sample's assignment is a distribution (sums to 1) and the
batch is spread evenly over the prototypes (each prototype receives B / K in total), which
rules out collapse onto one prototype without keeping any state between steps.

The batch is the union over all ranks: prototype marginals, the sample count and the
overflow guard are all-reduced, so every rank holds its own rows of the same global matrix
that a single process would compute on the gathered batch.
"""

from __future__ import annotations

import torch

from voxelfm.ssl._distributed import all_reduce_max_, all_reduce_sum_


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3
) -> torch.Tensor:
    """Doubly normalised teacher assignments.

    Args:
        teacher_logits: (N, K) logits of this rank's N samples over K prototypes; N may
            differ between ranks (masked patch counts do) and may be zero.
        temperature: teacher temperature; lower is sharper.
        n_iterations: alternating normalisation rounds (3 in DINOv2).

    Returns:
        (N, K) float32 assignments whose rows sum to 1 exactly and whose columns, summed
        over the global batch of B samples, approach B / K as ``n_iterations`` grows.
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    scaled = teacher_logits.float() / temperature  # (N, K)
    n_local, n_prototypes = scaled.shape

    n_samples = all_reduce_sum_(torch.tensor(float(n_local), device=scaled.device))
    if n_samples.item() == 0:
        return scaled.clone()  # nothing to assign on any rank

    # exp of a low-temperature logit overflows float32 beyond ~88; one global shift cancels
    # in the normalisation and keeps every rank's matrix on the same scale.
    local_max = scaled.max() if n_local else scaled.new_tensor(float("-inf"))
    q = torch.exp(scaled - all_reduce_max_(local_max)).t()  # (K, N)

    # Targets are kept at unit scale (prototype mass B / K, sample mass 1) rather than DINOv2's
    # 1/K and 1/B, which is the same fixed point but keeps entries far from float32 underflow.
    prototype_mass = n_samples / n_prototypes
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        per_prototype = all_reduce_sum_(q.sum(dim=1, keepdim=True))  # (K, 1)
        q *= prototype_mass / per_prototype.clamp_min(tiny)
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, N): each sample sums to 1
    return q.t()
