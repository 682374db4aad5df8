"""Mixed batches on offloaded or hooked layers (methods/lora/gathered.py).

The fast mixed-batch paths read the base weight and the LoRA factors directly instead of calling the modules.
Under accelerate offloading (`cpu_offload`, device_map with offload) those weights sit on the meta device and
a hook swaps them in on call, so reading them directly gave wrong logits (merged path for long rows) where HF
PEFT gives the right ones; a forward hook the user put on a base layer was skipped. Such layers now take the
loop. Checked against HF PEFT on the same adapter files, saved by either library.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import accelerate  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastpeft  # noqa: E402

from models import make_llama  # noqa: E402

NAMES = ["default", "b", "c", "d"]


def _config(lib):
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _save(lib, folder, count: int) -> None:
    torch.manual_seed(0)
    model = lib.get_peft_model(make_llama(), _config(lib))
    for seed, name in enumerate(NAMES[1:count], start=1):
        torch.manual_seed(seed)
        model.add_adapter(name, _config(lib))
    model.save_pretrained(str(folder))


def _load(lib, folder, count: int):
    torch.manual_seed(0)
    model = lib.PeftModel.from_pretrained(make_llama(), str(folder))
    for name in NAMES[1:count]:
        model.load_adapter(str(folder / name), name)
    return model.eval()


def _logits(model, rows: list[str], tokens: int) -> torch.Tensor:
    ids = torch.randint(0, 100, (len(rows), tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=rows).logits


# (adapters, rows, tokens): 2 adapters with long rows take the merged-weight path, 4 the gathered bmm path
PATHS = {"merged": (2, ["default", "b", "__base__", "b"], 64), "gathered": (4, NAMES + ["__base__", "b"], 5)}


@pytest.mark.parametrize("hf_saves", [True, False])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_offloaded_model_mixed_batch_matches_hf(tmp_path, path, hf_saves):
    count, rows, tokens = PATHS[path]
    _save(peft if hf_saves else fastpeft, tmp_path, count)
    want = _logits(_load(peft, tmp_path, count), rows, tokens)
    ours = _load(fastpeft, tmp_path, count)
    torch.testing.assert_close(_logits(ours, rows, tokens), want)  # before offloading: the fast path
    accelerate.cpu_offload(ours.get_base_model(), execution_device=torch.device("cpu"))
    assert ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.is_meta
    torch.testing.assert_close(_logits(ours, rows, tokens), want)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_forward_hook_on_a_base_layer_fires_in_mixed_batches_as_in_hf(tmp_path, path):
    count, rows, tokens = PATHS[path]
    _save(fastpeft, tmp_path, count)
    seen = {}
    for lib in (peft, fastpeft):
        model = _load(lib, tmp_path, count)
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        calls = []
        base.register_forward_hook(lambda module, args, out, calls=calls: calls.append(tuple(out.shape)))
        seen[lib] = (_logits(model, rows, tokens), calls)
    torch.testing.assert_close(seen[fastpeft][0], seen[peft][0])
    assert seen[fastpeft][1] == seen[peft][1] and seen[peft][1]
