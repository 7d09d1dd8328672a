"""k-NN evaluation of embeddings: weighted cosine voting (DINO's protocol) of held-out images against a bank; top-1
and top-5."""

from __future__ import annotations

import torch

TOP_K = (
    5  # the second accuracy reported beside top-1 (ImageNet's top-5), where the data has at least 5 classes
)


@torch.no_grad()
def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> tuple[float, float | None]:
    """Top-1 and top-5 accuracy (0-100) of k-NN voting with weights exp(cos/T); features must be L2-normalised.

    Top-1: the class with the most votes is the right one. Top-5: the right class got a vote and fewer than 5
    classes got more (a class no neighbour voted for is never a hit, whatever the ties among the others); None
    with fewer than 5 classes.
    """
    k = min(k, bank.shape[0])
    correct, correct_top5 = 0, 0
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ bank.T
        labels = query_labels[start : start + chunk]
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / temperature).exp())
        correct += int((votes.argmax(dim=1) == labels).sum())
        right = votes.gather(1, labels[:, None])
        ahead = (votes > right).sum(dim=1)
        correct_top5 += int(((right[:, 0] > 0) & (ahead < TOP_K)).sum())
    total = max(1, queries.shape[0])
    return 100.0 * correct / total, (100.0 * correct_top5 / total if num_classes >= TOP_K else None)
