"""C3A layers: the base output plus a block-circulant matrix times the input, computed with FFTs.

Chen et al., "Parameter-Efficient Fine-Tuning via Circular Convolution" (https://arxiv.org/abs/2407.19342).
For a (out, in) linear layer and block size b, the kernel has shape (m, n, b) with m = out / b, n = in / b.
Block (i, j) of the (out, in) update is the b x b matrix C_ij[t, s] = k_ij[(s - t) mod b], and the whole
update is divided by `in`. Applying a circulant block is a circular cross-correlation, which the FFT turns
into an elementwise product: C_ij x_j = irfft(conj(rfft(k_ij)) * rfft(x_j)). The FFTs run in float32 (the
kernel is created in float32, as half-precision FFTs are not available everywhere).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.layer import AdapterLayer


def circulant_product(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x (..., n * b) times the block-circulant matrix of `kernel` (m, n, b): (..., m * b), in float32
    (float64 for float64 inputs). Plain autograd differentiates it (HF PEFT 0.21's hand-written backward
    returns a wrong input gradient, so its gradients differ wherever an adapted layer feeds another)."""
    m, n, b = kernel.shape
    work = torch.float64 if torch.float64 in (x.dtype, kernel.dtype) else torch.float32
    x_freq = torch.fft.rfft(x.to(work).reshape(*x.shape[:-1], n, b), dim=-1)  # (..., n, b // 2 + 1)
    k_freq = torch.fft.rfft(kernel.to(work), dim=-1).conj()  # (m, n, b // 2 + 1)
    y_freq = torch.einsum("...nf,mnf->...mf", x_freq, k_freq)
    y = torch.fft.irfft(y_freq, n=b, dim=-1)  # (..., m, b)
    return y.reshape(*y.shape[:-2], m * b)


def circulant_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """The dense (m * b, n * b) block-circulant matrix of `kernel` (m, n, b): block (i, j) row t is k_ij
    rotated right by t."""
    m, n, b = kernel.shape
    pos = torch.arange(b, device=kernel.device)
    index = (pos[None, :] - pos[:, None]) % b  # index[t, s] = (s - t) mod b
    blocks = kernel[:, :, index]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


def check_block_size(block_size, in_features: int, out_features: int, name: str) -> None:
    """block_size must be a positive integer dividing both sizes of layer `name` (before anything is
    built)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"C3A block_size must be a positive integer, got {block_size!r} for '{name}'.")
    for what, size in (("input", in_features), ("output", out_features)):
        if size % block_size:
            raise ValueError(
                f"C3A block_size={block_size} does not divide the {what} size {size} of layer '{name}' "
                f"({in_features} -> {out_features}); pick a common divisor such as "
                f"{math.gcd(in_features, out_features)} (block_size, or this layer's entry in "
                "block_size_pattern).")


class C3ALinear(AdapterLayer):
    """`base(x) + circulant(kernel) @ x / in_features` on an nn.Linear."""

    adapter_param_names = ("c3a_kernel",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, block_size: int | None = None,
                 target_name: str = "an nn.Linear", **kwargs) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.target_name = target_name
        self.c3a_kernel = nn.ParameterDict()
        self.block_size: dict[str, int] = {}
        self.update_layer(adapter_name, config, block_size=block_size)

    def update_layer(self, adapter_name: str, config, block_size: int | None = None, **kwargs) -> None:
        b = config.block_size if block_size is None else block_size
        check_block_size(b, self.in_features, self.out_features, self.target_name)
        self.block_size[adapter_name] = b
        device = self.base_layer.weight.device
        kernel = torch.zeros(self.out_features // b, self.in_features // b, b, device=device)
        self._init_kernel(kernel, config.init_weights)
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel)

    @torch.no_grad()
    def _init_kernel(self, kernel: torch.Tensor, init) -> None:
        """Draws from the global RNG as HF PEFT does (same seed, same kernel); True keeps the zeros."""
        if init is True:
            return
        if init == "gaussian":
            kernel.normal_()
        elif init == "kaiming_uniform":
            bound = math.sqrt(1.0 / self.in_features)
            kernel.uniform_(-bound, bound)
        else:  # "xavier_uniform" or False: Glorot & Bengio's bound over the layer's fan-in + fan-out
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (self.in_features + self.out_features))
            kernel.uniform_(-bound, bound)

    def adapter_output(self, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return circulant_product(x, self.c3a_kernel[name]) / self.in_features

    def delta_weight(self, name: str) -> torch.Tensor:
        """(out, in), in the base weight's dtype (rounded before the division by in_features, as HF PEFT)."""
        dense = circulant_matrix(self.c3a_kernel[name].float()).to(self.base_layer.weight.dtype)
        return dense / self.in_features
