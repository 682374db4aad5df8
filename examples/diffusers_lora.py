"""diffusers' LoRA API on fastpeft: `python examples/diffusers_lora.py` (a tiny UNet built offline; with a
real pipeline, `pipe.load_lora_weights(...)`, `pipe.set_adapters(...)`, `pipe.fuse_lora()` work the same
way)."""

import fastpeft

fastpeft.install_as_peft()  # before diffusers is imported: it checks for peft when it loads

import diffusers  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402


def tiny_unet() -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=8, norm_num_groups=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def main() -> None:
    unet = tiny_unet().eval()
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)

    def run():
        return unet(sample, 1, encoder_hidden_states=text).sample

    base = run()
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
                     adapter_name="style")
    full = run()
    unet.set_adapters(["style"], weights=[0.0])
    print("weight 0 gives the base output:", torch.allclose(run(), base, atol=1e-6))
    unet.set_adapters(["style"], weights=[1.0])
    unet.fuse_lora()
    print("fused output equals the unfused one:", torch.allclose(run(), full, atol=1e-4))
    unet.unfuse_lora()
    unet.unload_lora()
    print("after unload: base output again:", torch.allclose(run(), base, atol=1e-5))


if __name__ == "__main__":
    with torch.no_grad():
        main()
