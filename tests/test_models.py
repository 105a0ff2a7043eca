"""dkn.models and dkn.families: loading, sizes, the orientation of a neuron's weight vectors, fingerprints."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_model

from dkn.families import FAMILIES, SUPPORTED, d_mlp_of, family_of
from dkn.models import ModelLoadError, fingerprint, load_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = list(FAMILY_CONFIGS)
PROMPT = "the capital of france is paris"


def test_family_of_known_and_unknown():
    assert family_of("gpt2").name == "gpt2"
    assert family_of("qwen2").name == family_of("mistral").name == "llama"
    assert family_of("gemma3_text").gated and family_of("bert").masked_lm
    with pytest.raises(ValueError) as err:
        family_of("t5")
    message = str(err.value)
    assert "'t5'" in message
    for model_type in (
        "gpt2",
        "gptj",
        "gpt_neo",
        "gpt_neox",
        "opt",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "bert",
        "roberta",
    ):
        assert model_type in message, model_type
    assert SUPPORTED in message
    assert sum(len(f.model_types) for f in FAMILIES) == len(SUPPORTED.split(", "))  # no type in two rows


def _down_in_features(lm) -> int:
    down = lm.down_proj(0)
    return down.weight.shape[0] if type(down).__name__ == "Conv1D" else down.in_features


@pytest.mark.parametrize("family", ALL)
def test_d_mlp_from_config_matches_the_weights(models, family):
    lm = models(family)
    _, _, kwargs = FAMILY_CONFIGS[family]
    stated = kwargs.get("intermediate_size") or kwargs.get("ffn_dim") or 4 * kwargs["n_embd"]
    assert lm.d_mlp == stated == _down_in_features(lm)
    assert d_mlp_of(lm.config, lm.family) == lm.d_mlp
    assert lm.n_layers == 3
    for layer in range(lm.n_layers):
        assert lm.output_vectors(layer).shape == (lm.d_mlp, lm.config.hidden_size)
        for vectors in lm.input_vectors(layer):
            assert vectors.shape == (lm.d_mlp, lm.config.hidden_size)


def _forward_prompt(lm, handles) -> None:
    """Run PROMPT through `lm` (no grad), then remove the hook `handles`, also when the forward fails."""
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([lm.tokenizer(PROMPT)["input_ids"]]))
    finally:
        for h in handles:
            h.remove()


def _down_io(lm, layer, replacement):
    """(down_proj output at position 0) when its input is replaced by `replacement` [d_mlp] everywhere."""
    out = {}

    def pre(module, args):
        return (torch.zeros_like(args[0]) + replacement,)

    def post(module, args, output):
        out["y"] = output.detach().reshape(-1, output.shape[-1])[0].clone()

    handles = [lm.down_proj(layer).register_forward_pre_hook(pre), lm.down_proj(layer).register_forward_hook(post)]
    _forward_prompt(lm, handles)
    return out["y"]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "bert"])
def test_output_vectors_are_what_a_neuron_writes(models, family):
    """Row i of output_vectors is the change of the MLP output when neuron i goes from 0 to 1 (llama and
    gemma have no down-projection bias; for the others the bias cancels in the difference)."""
    lm = models(family)
    layer = 1
    vectors = lm.output_vectors(layer).detach()
    zero = torch.zeros(lm.d_mlp)
    base = _down_io(lm, layer, zero)
    if lm.family.name in ("llama", "gemma"):
        assert torch.equal(base, torch.zeros_like(base))
    for i in (0, 5, lm.d_mlp - 1):
        one_hot = zero.clone()
        one_hot[i] = 1.0
        torch.testing.assert_close(_down_io(lm, layer, one_hot) - base, vectors[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_input_vectors_are_what_a_neuron_reads(models, family):
    lm = models(family)
    layer = 2
    vectors = lm.input_vectors(layer)
    modules = lm.up_projs(layer)
    if family == "llama":
        mlp = lm.blocks[layer].mlp
        assert modules == [mlp.gate_proj, mlp.up_proj]
        assert len(vectors) == 2
        assert torch.equal(vectors[0], mlp.gate_proj.weight) and torch.equal(vectors[1], mlp.up_proj.weight)
    else:
        assert len(vectors) == 1
    seen = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, k=k: seen.__setitem__(k, (args[0].detach(), out.detach())))
        for k, m in enumerate(modules)
    ]
    _forward_prompt(lm, handles)
    for k, (module, matrix) in enumerate(zip(modules, vectors)):
        x, out = seen[k]
        bias = module.bias if getattr(module, "bias", None) is not None else 0.0
        for i in (0, 3, lm.d_mlp - 1):  # neuron i's pre-activation is <input vector i, x> (+ bias)
            torch.testing.assert_close(
                out[..., i], x @ matrix[i].detach() + (bias[i] if torch.is_tensor(bias) else 0.0), rtol=1e-4, atol=1e-5
            )


def test_unknown_model_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="unknown model") as err:
        load_model("no-such-owner/no-such-model-dkn-test", device="cpu")
    assert time.monotonic() - start < 15
    assert "'default'" in str(err.value) and "local folder" in str(err.value)


def test_empty_name_and_file_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model("  ")
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(file))


def _save(lm, folder):
    lm.model.save_pretrained(folder, safe_serialization=True)
    lm.tokenizer.save_pretrained(folder)


def test_local_folder_round_trip(tmp_path):
    lm = tiny_model("llama", seed=3)
    folder = tmp_path / "tiny-llama"
    _save(lm, folder)
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    loaded = load_model(str(folder), device="cpu")
    assert loaded.name == str(folder) and "local folder" in loaded.label
    assert loaded.family.name == "llama" and loaded.n_layers == 3 and loaded.d_mlp == 48
    assert not loaded.model.training
    original, reloaded = lm.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == reloaded.keys()
    for k in original:
        assert torch.equal(original[k], reloaded[k]), k
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    assert ids.tolist() == [lm.tokenizer(PROMPT)["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_fingerprint_of_a_loaded_folder_equals_wrap_model(tmp_path):
    lm = tiny_model("llama", seed=3)
    _save(lm, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = load_model(str(tmp_path / "a"), device="cpu"), load_model(str(tmp_path / "b"), device="cpu")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint == wrap_model(lm.model, lm.tokenizer).fingerprint


def test_pickle_only_folder_is_refused(tmp_path):
    lm = tiny_model("gpt2")
    folder = tmp_path / "pickled"
    folder.mkdir()
    lm.model.config.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    torch.save(lm.model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"safetensors only \(no pickle files\)") as err:
        load_model(str(folder), device="cpu")
    assert "save_pretrained(folder, safe_serialization=True)" in str(err.value)


def test_fingerprint_tracks_the_weights(models):
    lm = models("gpt2")
    before = fingerprint(lm.model)
    assert before == lm.fingerprint == fingerprint(lm.model)  # deterministic
    assert len(before) == 16
    param = lm.down_proj(2).weight
    with torch.no_grad():
        old = param[0, 0].clone()
        param[0, 0] += 1e-3
        try:
            changed = fingerprint(lm.model)
        finally:
            param[0, 0] = old
    assert changed != before
    assert fingerprint(lm.model) == before
    assert tiny_model("gpt2", seed=1).fingerprint != before
    assert tiny_model("gpt2", seed=0).fingerprint == before
