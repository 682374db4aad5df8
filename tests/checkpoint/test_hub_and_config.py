"""Config JSON round trips, Hub repo ids resolved offline from the cache, push_to_hub, mixed batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import fastpeft
from fastpeft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from models import MODELS, forward


def _trained_mlp():
    model = get_peft_model(MODELS["mlp"][0](), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _fake_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `folder`'s files as huggingface_hub's cache holds a downloaded repo (offline use)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_load_from_hub_repo_id_offline_cache(tmp_path):
    model = _trained_mlp()
    x = MODELS["mlp"][1]()
    model.save_pretrained(tmp_path / "adapter")
    _fake_hub_cache(tmp_path / "cache", "someone/tiny-lora", tmp_path / "adapter")
    config = PeftConfig.from_pretrained("someone/tiny-lora", cache_dir=str(tmp_path / "cache"))
    assert isinstance(config, LoraConfig) and config.r == 4
    loaded = PeftModel.from_pretrained(MODELS["mlp"][0](), "someone/tiny-lora",
                                       cache_dir=str(tmp_path / "cache"))
    assert torch.allclose(forward(loaded, x), forward(model, x), atol=1e-6)
    weights = fastpeft.load_peft_weights("someone/tiny-lora", cache_dir=str(tmp_path / "cache"))
    assert set(weights) == set(fastpeft.get_peft_model_state_dict(model))


def test_unknown_repo_id_gives_clear_error(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(MODELS["mlp"][0](), "nobody/nothing", cache_dir=str(tmp_path))


def test_push_to_hub_uploads_saved_folder(monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        seen["repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, **kw):
        import os

        seen["files"] = sorted(os.listdir(folder_path))
        seen["config"] = json.loads(open(os.path.join(folder_path, "adapter_config.json")).read())
        seen["card"] = open(os.path.join(folder_path, "README.md")).read()
        return "ok"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    assert _trained_mlp().push_to_hub("me/my-lora") == "ok"
    assert seen["repo"] == "me/my-lora"
    assert seen["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "base_model: " not in seen["card"]  # built from a config: no base model to name
    assert "library_name: peft" in seen["card"] and "LORA adapter" in seen["card"]
    assert "trainable parameters" in seen["card"]
    assert seen["config"]["peft_type"] == "LORA" and seen["config"]["inference_mode"] is True


def test_config_json_roundtrip_and_unknown_keys(tmp_path, caplog):
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["a", "b"], rank_pattern={"a": 2}, use_rslora=True)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["target_modules"] == ["a", "b"] and "runtime_config" not in data
    data["a_field_from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert "a_field_from_the_future" in caplog.text
    assert isinstance(loaded, LoraConfig)
    assert (loaded.r, loaded.lora_alpha, loaded.target_modules, loaded.rank_pattern, loaded.use_rslora) == (
        6, 12, {"a", "b"}, {"a": 2}, True)


def test_mixed_batch_equals_each_adapter_alone():
    model = _trained_mlp()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin1"], init_lora_weights=False))
    x = MODELS["mlp"][1]()
    names = ["default", "other", "__base__"]
    mixed = forward(model, {"x": x, "adapter_names": names})
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = forward(model, x)
    with model.disable_adapter():
        alone["__base__"] = forward(model, x)
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], alone[name][i], atol=1e-6), name
    with pytest.raises(ValueError, match="unknown adapters"):
        forward(model, {"x": x, "adapter_names": ["nope"] * 3})


def test_model_card_names_base_and_keeps_user_card(tmp_path):
    model = _trained_mlp()
    model.peft_config["default"].base_model_name_or_path = "org/tiny-base"
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    n_params = sum(t.numel() for t in fastpeft.load_peft_weights(str(tmp_path)).values())
    assert "base_model: org/tiny-base" in card and f"{n_params:,d} trainable parameters" in card
    (tmp_path / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"


def test_push_to_hub_passes_pr_description_and_tags(monkeypatch):
    """transformers' PushToHubMixin signature (HF PEFT's PeftModel has it): create_pr opens a pull request
    instead of committing to main, commit_description and tags reach the Hub, a max_shard_size below the
    adapter file is refused (adapter files are never sharded)."""
    import os

    import huggingface_hub

    seen = {}

    def fake_upload_folder(self, repo_id, folder_path, **kw):
        seen.update(kw, card=open(os.path.join(folder_path, "README.md")).read())
        return "ok"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    model = _trained_mlp()
    assert model.push_to_hub("me/my-lora", create_pr=True, commit_description="why", tags=["mine"]) == "ok"
    assert seen["create_pr"] is True and seen["commit_description"] == "why"
    assert seen["commit_message"] == "Upload model"
    assert "- mine" in seen["card"] and "- lora" in seen["card"]
    with pytest.raises(TypeError):
        model.push_to_hub("me/my-lora", True)  # keyword-only after repo_id, as transformers
    with pytest.raises(ValueError, match="max_shard_size"):
        model.push_to_hub("me/my-lora", max_shard_size="1KB")
    model.push_to_hub("me/my-lora", max_shard_size="5GB")
    for bad in ("5GI", "five GB"):
        with pytest.raises(ValueError, match="is not a size"):
            model.push_to_hub("me/my-lora", max_shard_size=bad)
