"""What the command-line tests share: a tiny model saved as a local model folder, and the argv that runs a
command of `python -m dkn` on one fact with it."""

from __future__ import annotations

from pathlib import Path


def save_model_folder(lm, folder: Path) -> Path:
    """Save `lm` (weights as safetensors, and its tokenizer) into `folder`, loadable by `--model folder`."""
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)
    return folder


def fact_argv(command: str, folder: Path, prompt: str, answer: str, *extra: str, device: str = "cpu") -> list[str]:
    """The argv of `python -m dkn COMMAND` on the model folder `folder` and one fact, then `extra`."""
    return [command, "--model", str(folder), "--device", device, "--prompt", prompt, "--answer", answer, *extra]
