"""AdaMSS's initial subspaces of a weight: truncated SVD, k-means of the output rows, per-cluster factors.

For W (out, in) (with a bias b: [W | b], (out, in + 1), so the bias is adapted too), a seeded randomised SVD
gives W ~ U S V^T with U (out, R) and V^T (R, in'). The output rows are clustered by their rows of U into K
groups; group k (rows I_k) gets the update dW[I_k] = B_k A_k V^T with A_k (r_k, R) and B_k (|I_k|, r_k). A_k
starts as an orthonormal basis of the cluster's principal directions in U-coordinates (QR of U[I_k]^T Q_k, Q_k
the top r_k eigenvectors of the cluster's Gram matrix U[I_k] U[I_k]^T); B_k starts at zero.

The SVD runs under its own seed (`random_seed`) and k-means under a fixed one, as HF PEFT 0.21: a load
rebuilds the same clusters, which files do not store. The cluster-level SVDs draw from the global RNG (as HF
PEFT), so a seed before get_peft_model gives HF PEFT's values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KMEANS_SEED = 123456789  # HF PEFT's fixed k-means state: the clusters must be the same at every load
KMEANS_ITERATIONS = 10
SVD_ITERATIONS = 2


@dataclass
class Subspaces:
    """What `decompose` builds for one weight: projection V^T (R, in'), clusters (row indices per cluster,
    in cluster order), each cluster's initial A_k (r_k, R) (float32) and B_k (|I_k|, r_k)."""

    projection: torch.Tensor
    clusters: list[torch.Tensor]
    a_inits: list[torch.Tensor]
    b_inits: list[torch.Tensor]


def kmeans_labels(points: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster label per row of `points` (scikit-learn's KMeans, imported here: an optional dependency)."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as err:
        raise ImportError(
            "AdaMSS clusters each weight's singular vectors with scikit-learn's KMeans, which is not "
            "installed: pip install scikit-learn") from err
    model = KMeans(n_clusters=k, init="random", n_init=1, max_iter=KMEANS_ITERATIONS,
                   random_state=KMEANS_SEED)
    return torch.from_numpy(model.fit_predict(points.detach().cpu().numpy().astype("float32"))).long()


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (m, rank), V^T (rank, n)) of a randomised SVD drawn from `seed`; the global RNG is left as it
    was."""
    device = matrix.device
    kwargs = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**kwargs):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(matrix, q=rank, niter=SVD_ITERATIONS, M=None)
    return u[:, :rank], v[:, :rank].T


def cluster_rank(rows: torch.Tensor, config) -> int:
    """r_k: subspace_rank clamped to the cluster's size, or (use_dynamic_rank) to the number of singular
    values of the cluster's Gram matrix above svd_threshold times the largest; at least 1."""
    if not config.use_dynamic_rank:
        return max(min(rows.shape[0], config.subspace_rank), 1)
    gram = rows @ rows.T
    _, s, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=SVD_ITERATIONS)
    kept = int((s > config.svd_threshold * s[0]).sum().item())
    return max(min(kept, config.subspace_rank, s.shape[0]), 1)


def initial_a(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """A_k (rank, R): orthonormal rows spanning U[I_k]^T times the top eigenvectors of U[I_k] U[I_k]^T."""
    gram = rows @ rows.T
    eig, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=SVD_ITERATIONS)
    q, _ = torch.linalg.qr(rows.T @ eig[:, :rank], mode="reduced")
    return q.T.contiguous()


def decompose(weight: torch.Tensor, config, initial_b: Callable[[int, int], torch.Tensor]) -> Subspaces:
    """The subspaces of `weight` ((out, in'), any float dtype; computed in float32 on its device).
    `initial_b(rows, rank)` makes each B_k, called right after its A_k (HF PEFT's order of RNG draws)."""
    weight = weight.detach().to(torch.float32)
    rank = min(config.r, *weight.shape)
    u, vt = seeded_svd(weight, rank, config.random_seed)
    labels = kmeans_labels(u, min(config.num_subspaces, u.shape[0]))
    clusters = [torch.where(labels == k)[0] for k in range(int(labels.max().item()) + 1)]
    a_inits, b_inits = [], []
    for rows_index in clusters:
        rows = u[rows_index.to(u.device)]
        rank = cluster_rank(rows, config)
        a_inits.append(initial_a(rows, rank))
        b_inits.append(initial_b(rows.shape[0], rank))
    return Subspaces(vt, clusters, a_inits, b_inits)
