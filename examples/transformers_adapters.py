"""transformers' adapter API on fastpeft: `python examples/transformers_adapters.py` (a tiny Llama built
offline; with a real checkpoint, replace `tiny_llama()` by `AutoModelForCausalLM.from_pretrained(...)`)."""

import tempfile

import fastpeft

fastpeft.install_as_peft()  # first: `import peft` is fastpeft from here on

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)).eval()


def main() -> None:
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    base = model(ids).logits
    model.add_adapter(LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                      adapter_name="mine")
    print("active adapters:", model.active_adapters())
    print("adapter changes the logits by", f"{(model(ids).logits - base).abs().max().item():.3f}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        other = tiny_llama()
        other.load_adapter(folder, adapter_name="loaded")
        same = torch.allclose(other(ids).logits, model(ids).logits, atol=1e-6)
        print("reloaded with transformers' load_adapter, same logits:", same)
        reloaded = fastpeft.PeftModel.from_pretrained(tiny_llama(), folder)
        print("reloaded with fastpeft.PeftModel, same logits:",
              torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6))
    model.disable_adapters()
    print("disabled: base logits again:", torch.equal(model(ids).logits, base))


if __name__ == "__main__":
    with torch.no_grad():
        main()
