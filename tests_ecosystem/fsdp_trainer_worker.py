"""Worker for tests_ecosystem/test_fsdp_trainer.py: transformers' Trainer on a fastpeft LoRA Llama, FSDP2 on
CPU.

`python -m torch.distributed.run --nproc_per_node 2 fsdp_trainer_worker.py fsdp OUT` trains 2 steps with
`TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2, ...})` on gloo;
`python fsdp_trainer_worker.py single OUT` is the oracle: one process, no FSDP, the same seed and the same
global batch of 4. fastpeft serves as `peft` (install_as_peft) in every process. Each process writes under
OUT:

- `rank{R}.safetensors`: its adapter after training (the full, gathered adapter under FSDP2);
- `rank{R}.json`: the distributed type, the FSDP units, the dataset rows it read, the loss log;
- `adapter/`: what `trainer.save_model` wrote (rank 0 only, for FSDP via accelerate's FULL_STATE_DICT gather).

Why the shim (`_let_accelerate_shard_on_cpu`): accelerate 1.x turns a Trainer's FSDP plugin into
DistributedType.FSDP only for GPU-like process types (MULTI_GPU / MULTI_XPU / ... in
AcceleratorState.__init__); on CPU the state stays MULTI_CPU and the Trainer silently runs DDP. The shim
redoes that one assignment on MULTI_CPU, leaving everything downstream (Trainer, accelerate's
fsdp2_prepare_model, torch's fully_shard) as shipped.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # tests/models.py

import fastpeft  # noqa: E402

fastpeft.install_as_peft()  # before transformers' Trainer imports peft

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import models  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 2


def _let_accelerate_shard_on_cpu() -> None:
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # a later AcceleratorState() copies PartialState's MULTI_CPU back in: keep FSDP while a plugin is held
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init


class Rows(torch.utils.data.Dataset):
    """Eight distinct causal-LM rows; remembers which indices this process read."""

    def __init__(self):
        self.read: list[int] = []

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.read.append(int(i))
        ids = (torch.arange(8) * (i + 1) + 7 * i) % 100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora_llama():
    config = fastpeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"])
    return fastpeft.get_peft_model(models.make_llama(), config)


def trained_adapter(trainer) -> dict[str, torch.Tensor]:
    """The adapter as one tensor per key on every rank (gathered from the DTensor shards under FSDP2)."""
    model = trainer.model
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state = fastpeft.get_peft_model_state_dict(model, state_dict=full)
    else:
        state = fastpeft.get_peft_model_state_dict(model)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def fsdp_units(model) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    return sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))


def main(mode: str, out: str) -> None:
    import transformers

    fsdp = mode == "fsdp"
    if fsdp:
        _let_accelerate_shard_on_cpu()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    # sync_module_states=True is refused on CPU by accelerate's plugin; every rank builds equal weights
    if fsdp:
        extra = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT",
                                              "sync_module_states": False})
    args = transformers.TrainingArguments(
        os.path.join(out, "trainer"), per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS,
        learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, **extra)
    data = Rows()
    trainer = transformers.Trainer(model=lora_llama(), args=args, train_dataset=data)
    trainer.train()
    rank = trainer.args.process_index
    state = trained_adapter(trainer)
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    info = {
        "world": world,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "wrapped_class": type(trainer.model_wrapped).__name__,
        "fsdp_units": fsdp_units(trainer.model_wrapped),
        "rows_read": data.read,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(info, fh)
    trainer.save_model(os.path.join(out, "adapter"))  # a collective under FSDP: every rank calls it
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # every result is on disk: skip the interpreter's teardown, where a native thread left by the CPU
        # collectives sometimes aborts the process ("terminate called without an active exception")
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
