"""k-NN evaluation of embeddings: weighted cosine voting (DINO's protocol) of held-out images against a bank."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from dali_kd.data import Batch


@torch.no_grad()
def extract_embeddings(
    embed: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings and labels of every batch, on the batches' device."""
    features, labels = [], []
    for batch in batches:
        features.append(F.normalize(embed(batch.images).float(), dim=-1))
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (0-100) of k-NN voting with weights exp(cos/T); features must be L2-normalised."""
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ bank.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / temperature).exp())
        correct += int((votes.argmax(dim=1) == query_labels[start : start + chunk]).sum())
    return 100.0 * correct / max(1, queries.shape[0])
