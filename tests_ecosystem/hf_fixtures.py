"""Adapter folders written by HF PEFT (the pinned oracle), stored in tests_ecosystem/data/ for the ecosystem
suite, which runs where HF PEFT is not installed. `python tests_ecosystem/hf_fixtures.py` (dev venv) rewrites
them; tests/integrations/test_ecosystem_fixtures.py checks that HF PEFT still writes exactly these tensors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def hf_lora_llama(folder: Path) -> None:
    """LoRA r=4 on q_proj / v_proj of tests/models.make_llama, weights moved off their init by seeded
    noise."""
    import peft
    import torch

    import models

    torch.manual_seed(11)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(models.make_llama(), config)
    models.perturb(model, seed=11, scale=0.1)
    model.save_pretrained(str(folder))


FIXTURES = {"hf_lora_llama": hf_lora_llama}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, build in FIXTURES.items():
        build(DATA / name)
        print("wrote", DATA / name)
