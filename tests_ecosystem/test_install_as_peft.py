"""fastpeft.install_as_peft(): `import peft` and HF PEFT's module paths are fastpeft, with a version
record."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

import fastpeft
from fastpeft.peft_alias import PEFT_API_VERSION, module_paths


def test_peft_is_fastpeft_with_an_api_version():
    import peft

    assert peft.LoraConfig is fastpeft.LoraConfig and peft.PeftModel is fastpeft.PeftModel
    assert peft.__version__ == PEFT_API_VERSION == importlib.metadata.version("peft")
    assert fastpeft.__version__ != PEFT_API_VERSION  # fastpeft keeps its own
    assert importlib.util.find_spec("peft") is not None


@pytest.mark.parametrize("path", module_paths())
def test_module_paths_are_fastpeft_modules(path):
    module = importlib.import_module(f"peft.{path}")
    assert module is importlib.import_module(f"fastpeft.{path}")


def test_adapter_layers_are_hf_base_classes():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper
    from peft.utils.other import AuxiliaryTrainingWrapper

    import models

    model = fastpeft.get_peft_model(models.make_llama(), fastpeft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                             modules_to_save=["lm_head"]))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(isinstance(m, LoraLayer) for m in layers)
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrappers and isinstance(wrappers[0], AuxiliaryTrainingWrapper)


def test_unserved_paths_fail_naming_the_module():
    # ShadowPEFT's diffusion backends are not implemented (the package peft.tuners.shadow is served)
    with pytest.raises(ImportError, match=r"peft\.tuners\.shadow\.diffusion_models is an HF PEFT module that "
                                          "fastpeft does not"):
        importlib.import_module("peft.tuners.shadow.diffusion_models")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_idempotent_and_before_transformers_gates():
    result = _run("import fastpeft; fastpeft.install_as_peft(); fastpeft.install_as_peft()\n"
                  "from transformers.utils.peft_utils import check_peft_version; "
                  "check_peft_version('0.22.0')\n"
                  "import accelerate.utils, diffusers.utils\n"
                  "assert accelerate.utils.is_peft_available() and diffusers.utils.USE_PEFT_BACKEND\n"
                  "import transformers.trainer, trl; print('ok')")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_refused_after_another_peft_was_imported(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("__version__ = '0.21.2'\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import peft, fastpeft\n"
            "try:\n    fastpeft.install_as_peft()\nexcept RuntimeError as e:\n    print(e)\n")
    result = _run(code)
    assert "a different 'peft' module was already imported" in result.stdout, result.stdout + result.stderr
    assert str(tmp_path / "peft") in result.stdout
