"""Row-index tensors built from Python lists without a host-device synchronisation.

`torch.tensor(rows, device="cuda")` copies a pageable host buffer with a blocking copy, which waits for the
whole CUDA stream: once per adapter per layer in a mixed-adapter batch, every queued kernel is waited for.
Built on the host and copied with `non_blocking=True` instead, the copy is queued on the stream like any
kernel (for pageable memory the driver stages the source before the call returns, so the host list may be
freed at once). On the CPU both are the same tensor.
"""

from __future__ import annotations

import torch


def index_tensor(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`, queued rather than synchronising on an
    accelerator."""
    host = torch.tensor(values, dtype=dtype)
    if host.device == device or device.type == "cpu":
        return host
    return host.to(device, non_blocking=True)
