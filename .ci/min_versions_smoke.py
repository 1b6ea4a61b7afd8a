"""Run inside the minimum-versions venv (.ci/min_versions.py): every module imports, a tiny
generation runs, the shipped toy model loads (its tokenizers need the transformers floor), and a
standard peft LoRA stacks with a MUSAR LoRA through diffusers' loader (the peft/diffusers floor)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import pkgutil
import sys
import tempfile
from pathlib import Path

OPTIONAL = {"gradio", "tensorboard", "wandb", "torchao", "bitsandbytes", "gguf", "playwright"}  # extras


def import_everything() -> int:
    import musar

    count = 0
    for mod in pkgutil.walk_packages(musar.__path__, "musar."):
        if mod.name.endswith(".__main__"):
            continue  # runs the CLI
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in OPTIONAL:
                raise
            print(f"  skipped {mod.name}: optional {e.name} not installed")
            continue
        count += 1
    return count


def main() -> None:
    names = ["torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
             "datasets", "pyarrow", "numpy", "pillow", "pyyaml", "tqdm"]
    print("versions:", ", ".join(f"{n} {md.version(n)}" for n in names))
    print(f"imported {import_everything()} modules")

    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    from musar.lora import BranchLoRAConfig, inject_branch_lora
    from musar.lora.io import save_branch_lora
    from musar.pipelines.pipeline_musar import MusarPipeline
    from musar.pipelines.presets import tiny_pipeline
    from musar.toy.model import load_toy_pipeline

    subjects = [(Image.new("RGB", (40, 40), (200, 40, 40)), "a corgi"), (Image.new("RGB", (30, 50), (40, 200, 40)), "a red backpack")]
    args = {"height": 64, "width": 64, "num_inference_steps": 2, "condition_size": 32, "progress": False}
    prompt = "a corgi and a red backpack on the beach"
    with tempfile.TemporaryDirectory() as tmp:
        donor = tiny_pipeline().transformer
        inject_branch_lora(donor, BranchLoRAConfig(noise_rank=2, subject_rank=4))
        musar_file = save_branch_lora(donor, Path(tmp) / "musar.safetensors")
        style = tiny_pipeline().transformer
        style.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "proj_mlp"], init_lora_weights=False))
        MusarPipeline.save_lora_weights(Path(tmp) / "style", transformer_lora_layers=get_peft_model_state_dict(style))
        pipe = tiny_pipeline()
        pipe.load_lora_weights(musar_file)
        pipe.load_lora_weights(Path(tmp) / "style", adapter_name="style", token_kinds=("prompt", "noise"))
        pipe.set_adapters(["style"], [0.8])
        out = pipe(prompt, subjects, generator=torch.Generator().manual_seed(0), **args)
        assert out.images[0].size == (64, 64)
        pipe.unload_lora_weights()
    # Every weight of the shipped text encoders must load (an older transformers reads the
    # checkpoint's key layout silently wrong: "MISSING" keys are freshly initialised).
    from transformers import CLIPTextModel, T5EncoderModel

    from musar.toy.model import SHIPPED_BASE

    for cls, sub in ((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")):
        _, info = cls.from_pretrained(SHIPPED_BASE / sub, output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        assert not bad, f"toy {sub} does not load with this transformers: {bad}"
    toy = load_toy_pipeline()
    image = toy("a red circle and a blue square", [(subjects[0][0], "a red circle"), (subjects[1][0], "a blue square")],
                generator=torch.Generator().manual_seed(0), **{**args, "height": 64, "width": 64}).images[0]
    assert image.size == (64, 64)
    print("tiny generation with stacked LoRAs, toy generation: ok")


if __name__ == "__main__":
    main()
    sys.exit(0)
