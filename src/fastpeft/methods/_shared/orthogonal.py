"""Orthogonal-transform math shared by OFT and BOFT, and their common layer base (`RotationLayer`).

OFT (Qiu et al., 2023, https://arxiv.org/abs/2306.07280) rotates a layer's input with a block-diagonal
orthogonal matrix; BOFT (Liu et al., 2024, https://arxiv.org/abs/2311.06243) multiplies several permuted
block-diagonal factors ("butterfly") into one rotation. Each block is made orthogonal with the Cayley
transform of a skew-symmetric matrix Q: R = (I - Q)(I + Q)^-1, computed with one batched linear solve (never
an explicit inverse), or with a truncated Neumann series when the config asks for it (HF PEFT's coefficients,
see `cayley_neumann`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.layer import AdapterLayer


# ---------------------------------------------------------------------------------------------- skew matrices
def triu_index(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column indices of the strict upper triangle of a size x size matrix (OFT's parameter layout)."""
    rows, cols = torch.triu_indices(size, size, 1, device=device)
    return rows, cols


def skew_from_vector(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(b, size*(size-1)/2) upper-triangle entries -> (b, size, size) skew-symmetric matrices A - A^T."""
    rows, cols = triu_index(size, vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def skew_from_square(data: torch.Tensor) -> torch.Tensor:
    """(b, n, n) free matrices -> their skew-symmetric part (A - A^T) / 2 (BOFT's parameter layout)."""
    return 0.5 * (data - data.transpose(-2, -1))


# ------------------------------------------------------------------------------------------- Cayley transform
def cayley_exact(skew: torch.Tensor) -> torch.Tensor:
    """(I - Q)(I + Q)^-1 for a batch of skew-symmetric Q, as the solution X of X (I + Q) = I - Q."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients c_k of sum_k c_k Q^k used by HF PEFT >= 0.18 for `num_cayley_neumann_terms = terms`.

    1 term: I; 2 terms: I + 2Q; otherwise I + 2Q + ... + 2Q^(top-1) + Q^top with top = max(terms - 1, 3).
    """
    if terms <= 1:
        return [1.0]
    if terms == 2:
        return [1.0, 2.0]
    top = max(terms - 1, 3)
    return [1.0] + [2.0] * (top - 1) + [1.0]


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """Truncated Neumann-series Cayley transform: cheap (matmuls only), orthogonal up to O(|Q|^terms)."""
    coefficients = neumann_coefficients(terms)
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    result = eye.clone()
    power = eye
    for coefficient in coefficients[1:]:
        power = skew if power is eye else torch.bmm(power, skew)
        result = result + coefficient * power
    return result


def clip_frobenius(skew: torch.Tensor, bound: float) -> torch.Tensor:
    """Each (n, n) matrix of the batch whose Frobenius norm exceeds `bound` rescaled to norm ~`bound` (the
    Neumann series of the Cayley transform converges for |Q| < 1); others, and non-finite norms, kept. No
    Python branch on the values, so it compiles without a graph break."""
    norm = torch.linalg.matrix_norm(skew).unsqueeze(-1).unsqueeze(-1)  # (b, 1, 1)
    over = torch.isfinite(norm) & (norm > bound)
    return torch.where(over, skew * (bound / (norm + 1e-12)), skew)


def cayley(skew: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal blocks from skew-symmetric `skew`: exact (linear solve) or the Neumann series when terms
    given."""
    dtype = skew.dtype
    if neumann_terms is None:
        return cayley_exact(skew).to(dtype)
    return cayley_neumann(skew, neumann_terms).to(dtype)


def orthogonality_error(blocks: torch.Tensor) -> torch.Tensor:
    """max |R R^T - I| over a batch of square blocks (0 for exactly orthogonal blocks)."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (blocks @ blocks.transpose(-2, -1) - eye).abs().max()


# ---------------------------------------------------------------------------------------------- caching
def cache_key(param: torch.Tensor) -> tuple | None:
    """Identity of `param`'s current values for reusing a rotation outside autograd, or None when a rotation
    built from it must be recomputed (it needs a graph). In-place updates bump `_version`; `.data = ...` moves
    storage."""
    if torch.is_grad_enabled() and param.requires_grad:
        return None
    return (param._version, param.data_ptr(), param.shape, param.dtype, param.device)


def cached(store: dict, name: str, param: torch.Tensor, compute):
    """`compute()`, reused from `store[name]` while `param` is unchanged and no gradient is wanted."""
    key = cache_key(param)
    if key is None:
        store.pop(name, None)
        return compute()
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    store[name] = (key, value)
    return value


# -------------------------------------------------------------------------------------------- constrained OFT
def project_coft(vec: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: shrink each block's skew matrix onto the Frobenius ball of radius eps / sqrt(#blocks).

    Blocks already inside the ball are kept; the others are rescaled onto its surface.
    """
    skew = skew_from_vector(vec, size)
    radius = eps / torch.sqrt(torch.tensor(float(vec.shape[0])))
    norm = torch.linalg.matrix_norm(skew).unsqueeze(-1)
    inside = norm <= radius
    return torch.where(inside, vec, vec * (radius / norm))


# ---------------------------------------------------------------------------------------------- block sizes
def nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of `n` closest to `wanted` (ties go to the smaller one; `n` itself if wanted >= n)."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


# -------------------------------------------------------------------------------------------- block rotations
def expand_shared(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """(1, b, b) shared blocks repeated to `count` blocks; (count, b, b) returned as given."""
    return blocks.expand(count, -1, -1) if blocks.shape[0] != count else blocks


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (..., r*b) -> for each of the r slices x_k @ R_k (or x_k @ R_k^T), i.e. x @ blockdiag(R) (^T)."""
    count, size = blocks.shape[0], blocks.shape[-1]
    parts = x.reshape(*x.shape[:-1], count, size)
    pattern = "...rk,rck->...rc" if transpose else "...rk,rkc->...rc"
    return torch.einsum(pattern, parts, blocks).reshape(x.shape)


def unrotate_blocks(y: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The x with `rotate_blocks(x, blocks, transpose) == y`, by a batched linear solve per block (exact even
    when the blocks are only nearly orthogonal, e.g. from a short Neumann series)."""
    count, size = blocks.shape[0], blocks.shape[-1]
    lead = y.shape[:-1]
    parts = y.reshape(-1, count, size).transpose(0, 1)  # (r, rows, b)
    factor = blocks.transpose(-2, -1) if transpose else blocks
    solved = torch.linalg.solve(factor, parts, left=False)
    return solved.transpose(0, 1).reshape(*lead, count * size)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(r, b, b) -> the dense (r*b, r*b) block-diagonal matrix."""
    return torch.block_diag(*torch.unbind(blocks))


# ------------------------------------------------------------------------------------------- butterfly (BOFT)
def butterfly_permutation(n: int, groups: int, chunk: int) -> torch.Tensor:
    """Index permutation of one butterfly factor: inside each of `groups` equal segments of [0, n), the chunks
    of `chunk` entries are reordered evens first, then odds (chunk 0, 2, 4, ..., 1, 3, 5, ...)."""
    segment = n // groups
    if groups * chunk * 2 > n:
        raise ValueError(f"Butterfly permutation of size {n} cannot have {groups} groups of chunk {chunk}.")
    n_chunks = segment // chunk
    order = list(range(0, n_chunks, 2)) + list(range(1, n_chunks, 2))
    inside = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in order])
    return torch.cat([inside + start for start in range(0, n, segment)])


def butterfly_permutations(n: int, block_num: int, block_size: int, factors: int) -> list[torch.Tensor]:
    """One index permutation per butterfly factor (the identity for plain block-diagonal OFT,
    factors == 1)."""
    if factors == 1:
        return [torch.arange(n)]
    return [butterfly_permutation(n, block_num // 2**i, block_size // 2) for i in range(factors)]


def butterfly_matrix(blocks: torch.Tensor, perms: list[torch.Tensor]) -> torch.Tensor:
    """(N, D, H, H) orthogonal blocks -> F_{N-1} ... F_1 F_0 with F_i = P_i blockdiag(blocks[i]) P_i^T, where
    (P B P^T)[a, c] = B[perm[a], perm[c]]."""
    result = None
    for factor_blocks, perm in zip(blocks, perms):
        dense = block_diagonal(factor_blocks)
        perm = perm.to(dense.device)
        factor = dense[perm][:, perm]
        result = factor if result is None else factor @ result
    return result


def butterfly_block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """BOFT's multiplicative dropout: in one random butterfly factor, int(p * D) random blocks become
    identity."""
    n_factors, count, size, _ = blocks.shape
    chosen = int(torch.randint(0, n_factors, (1,)).item())
    dropped = int(p * count)
    mask = torch.cat([torch.ones(dropped), torch.zeros(count - dropped)])[torch.randperm(count)]
    full = torch.zeros(n_factors, count, 1, 1, device=blocks.device)
    full[chosen] = mask.view(count, 1, 1).to(blocks.device)
    eye = torch.eye(size, device=blocks.device).expand(n_factors, count, size, size)
    return (1 - full) * blocks + full * eye


# ---------------------------------------------------------------------------------------------- layer base
class RotationLayer(AdapterLayer):
    """What the OFT and BOFT layers share: the base weight seen as rows over the rotated axis, written back
    after a float32 merge or unmerge. Subclasses give `rotated_dim` and may refuse base layers in
    `check_base`."""

    def check_base(self) -> None:
        """Refuse base layers the method cannot rotate (overridden per layer type)."""

    def rotated_dim(self) -> int:
        raise NotImplementedError

    def weight_rows(self) -> torch.Tensor:
        """The base weight as (rows, rotated_dim), a view sharing storage."""
        weight = self.base_layer.weight.data
        return weight.reshape(weight.shape[0], -1)

    def store_rows(self, rows: torch.Tensor, dtype: torch.dtype, checked_adapter: str | None = None) -> None:
        """`rows` (as from `weight_rows`) become the base weight in `dtype`; with `checked_adapter`
        (safe_merge) non-finite values are refused first."""
        if checked_adapter is not None and not torch.isfinite(rows).all():
            raise ValueError(
                f"NaNs or infs in the merged weights: adapter '{checked_adapter}' seems to be broken.")
        self.base_layer.weight.data = rows.to(dtype).reshape(self.base_layer.weight.shape)


def conv_rotated_dim(base: nn.Conv2d) -> int:
    """A Conv2d's weight rotated as (out, in * kh * kw) rows."""
    kh, kw = base.kernel_size
    return base.in_channels * kh * kw
