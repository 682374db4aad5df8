"""Orthogonal wavelet filters and the one-level 2-D inverse wavelet transform WaveFT uses.

Written here rather than imported: PyWavelets is not a dependency. The filters are computed, not tabulated:

- Daubechies dbN (N vanishing moments, 2N taps) by spectral factorisation (Daubechies, "Ten Lectures on
  Wavelets", SIAM 1992, ch. 6.1): |m0(w)|^2 = cos^{2N}(w/2) P(sin^2(w/2)) with
  P(y) = sum_{k<N} C(N-1+k, k) y^k. Each root y of P gives a reciprocal pair {z, 1/z} with
  z + 1/z = 2 - 4y; the low-pass filter is (1 + z)^N times one factor (z - r) per pair, scaled so its taps
  sum to sqrt(2). dbN keeps the root inside the unit circle of every pair (minimum phase).
- Symlets symN: the same factorisation with another choice of root per pair (Daubechies 1992, ch. 8.1,
  "least asymmetric"). Which choice gives the published symN filters is a property of those tables, so the
  choice is listed per order (`_SYMLET_CHOICES`) rather than searched by a phase criterion, which picks a
  different factor for sym7 and sym10.
- Coiflet coif1 in closed form (Daubechies 1993, "Orthonormal bases of compactly supported wavelets II",
  SIAM J. Math. Anal. 24(2)): sqrt(2)/32 * (1-s, 5+s, 14+2s, 14-2s, 1-s, -3+s), s = sqrt(7).

Computed in float64 the taps agree with the published tables to ~1e-12 (db3 and the symlets are tabulated
to about 12 digits), far below float32 resolution. Higher orders are refused: dbN / symN beyond 10 lose
digits to root finding, and the longer coiflets have no closed form (HF PEFT 0.21 itself accepts db11-db38,
sym11-sym20 and coif2-coif17 in its config but its own filter table stops at db10 / sym10 / coif5, and its
coif5 table has 48 taps instead of 30).

Filter conventions (as PyWavelets): `rec_lo` is the low-pass filter h, `rec_hi[k] = (-1)^k h[L-1-k]`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

_MAX_ORDER = 10
# per symlet order: for the roots y of P sorted by (real part, |imag part|) (one of each conjugate pair),
# 0 keeps the factor root inside the unit circle, 1 the one outside
_SYMLET_CHOICES = {2: (0,), 3: (0,), 4: (0, 1), 5: (1, 0), 6: (1, 0, 1), 7: (1, 0, 0), 8: (0, 1, 0, 1),
                   9: (0, 1, 1, 0), 10: (1, 0, 1, 0, 1)}

SUPPORTED_WAVELETS = tuple([f"db{n}" for n in range(1, _MAX_ORDER + 1)]
                           + [f"sym{n}" for n in range(2, _MAX_ORDER + 1)] + ["coif1"])

# HF PEFT 0.21's config accepts these names (its WAVELET_REDUCTIONS keys); fastpeft refuses the ones not in
# SUPPORTED_WAVELETS with the list above
ACCEPTED_BY_HF = tuple([f"db{n}" for n in range(1, 39)] + [f"sym{n}" for n in range(2, 21)]
                       + [f"coif{n}" for n in range(1, 18)])


def _daubechies_roots(n: int) -> list[complex]:
    """Roots y of P(y) (degree n-1), one of each conjugate pair, sorted by (real part, |imag part|)."""
    coefficients = [math.comb(n - 1 + k, k) for k in range(n)]
    roots = np.roots(coefficients[::-1]) if n > 1 else np.array([])
    kept = [complex(y) for y in roots if y.imag >= -1e-12]
    return sorted(kept, key=lambda y: (round(y.real, 9), abs(y.imag)))


def _spectral_factor(n: int, choices: tuple[int, ...]) -> np.ndarray:
    """(2n,) low-pass taps: (1 + z)^n times, per root y of P, (z - r) with r the chosen root of
    z^2 - (2 - 4y) z + 1 (and its conjugate for complex y)."""
    poly = np.array([1.0 + 0j])
    for _ in range(n):
        poly = np.convolve(poly, [1.0, 1.0])
    for y, outside in zip(_daubechies_roots(n), choices):
        r = sorted(np.roots([1.0, -(2.0 - 4.0 * y), 1.0]), key=abs)[outside]
        poly = np.convolve(poly, [1.0, -r])
        if abs(y.imag) > 1e-12:
            poly = np.convolve(poly, [1.0, -np.conj(r)])
    taps = poly.real
    return taps * math.sqrt(2.0) / taps.sum()


def check_wavelet(name) -> None:
    if name not in SUPPORTED_WAVELETS:
        raise ValueError(
            f"WaveFTConfig.wavelet_family={name!r} is not supported by fastpeft's wavelet transform; "
            "supported: "
            f"{', '.join(SUPPORTED_WAVELETS)} (HF PEFT's config also lists db11-db38, sym11-sym20 and "
            "coif2-coif17, whose filters fastpeft does not compute).")


@functools.cache
def lowpass(name: str) -> tuple[float, ...]:
    """The reconstruction low-pass filter h of wavelet `name` (taps summing to sqrt(2))."""
    check_wavelet(name)
    if name == "coif1":
        s = math.sqrt(7.0)
        taps = np.array([1 - s, 5 + s, 14 + 2 * s, 14 - 2 * s, 1 - s, -3 + s]) * math.sqrt(2.0) / 32.0
    elif name.startswith("db"):
        n = int(name[2:])
        taps = _spectral_factor(n, (0,) * (n - 1))
    else:
        taps = _spectral_factor(int(name[3:]), _SYMLET_CHOICES[int(name[3:])])
    return tuple(float(t) for t in taps)


def synthesis_filters(name: str, device, dtype) -> torch.Tensor:
    """(2, 1, L): the low-pass h and high-pass g[k] = (-1)^k h[L-1-k] reconstruction filters."""
    h = lowpass(name)
    g = [(-1) ** k * h[len(h) - 1 - k] for k in range(len(h))]
    return torch.tensor([h, g], device=device, dtype=dtype).unsqueeze(1)


def inverse_dwt2(approx: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor,
                 diagonal: torch.Tensor, name: str) -> torch.Tensor:
    """One-level 2-D inverse DWT of four (h, w) sub-bands -> (2h + 2 - L, 2w + 2 - L).

    Each band is upsampled by 2 in both directions and filtered by the outer product of its row and column
    filters (approximation: low x low; horizontal detail: high-pass along rows x low-pass along columns;
    vertical: low x high; diagonal: high x high, PyWavelets' (cA, (cH, cV, cD)) layout); the four results
    are summed. That is one stride-2 transposed convolution with four input channels, whose full output has
    2h - 2 + L rows; L - 2 are dropped at each end, the samples where the zero-extended border enters, which
    leaves 2h for the Haar filter (L = 2). One 2-D convolution rather than two separable 1-D passes keeps the
    summation order of HF PEFT's kernel, so float32 results agree to the last bit.
    """
    filters = synthesis_filters(name, approx.device, approx.dtype)  # (2, 1, L): low, high
    low, high = filters[0, 0], filters[1, 0]
    # (4, 1, L, L): row filter (first axis) x column filter (second axis) per band
    kernels = torch.stack([torch.outer(low, low), torch.outer(high, low), torch.outer(low, high),
                           torch.outer(high, high)]).unsqueeze(1)
    bands = torch.stack([approx, horizontal, vertical, diagonal]).unsqueeze(0)  # (1, 4, h, w)
    full = F.conv_transpose2d(bands, kernels, stride=2)[0, 0]  # (2h - 2 + L, 2w - 2 + L)
    cut = len(low) - 2
    return full[cut:full.shape[0] - cut, cut:full.shape[1] - cut] if cut > 0 else full
