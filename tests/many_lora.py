"""Models holding several LoRA adapters of mixed ranks / scalings with random factors: the setup of the
mixed-batch tests (gathered, stacked, merged paths) in either library."""

from __future__ import annotations

import torch

from fastpeft.methods.lora import gathered


def varied_lora_config(lib, i: int, target_modules, **extra):
    """Adapter i's config: ranks 2 / 4 / 8 in turn, distinct alphas, rsLoRA on odd i, random init."""
    r = (2, 4, 8)[i % 3]
    return lib.LoraConfig(r=r, lora_alpha=r + 3 * i, use_rslora=i % 2 == 1, target_modules=target_modules,
                          init_lora_weights=False, **extra)


def with_adapters(lib, make_model, target_modules, n: int, **extra):
    """`make_model()` with adapters a0..a{n-1} (`varied_lora_config`), factors randomised, in eval mode."""
    model = lib.get_peft_model(make_model(), varied_lora_config(lib, 0, target_modules, **extra),
                               adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", varied_lora_config(lib, i, target_modules, **extra))
    randomize_lora(model, seed=0)
    return model.eval()


def randomize_lora(model, seed: int, only: str = "") -> None:
    """Every LoRA tensor (of adapter `only`, if given) drawn anew: N(0, 0.3^2), in name order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name and f".{only}" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def loop_logits(model, inputs, names) -> torch.Tensor:
    """Logits of a mixed batch (`adapter_names=names`) through the per-adapter loop: no stacks, no gathered
    path (the reference the fast paths are held to)."""
    saved, gathered.MIN_ADAPTERS = gathered.MIN_ADAPTERS, 10**9
    try:
        with torch.no_grad():
            return model(input_ids=inputs, adapter_names=names).logits
    finally:
        gathered.MIN_ADAPTERS = saved
