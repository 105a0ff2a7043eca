"""Device and dtype hygiene, checked on the CPU: every tensor the library makes takes its device from
the model or the inputs, so that the same code runs on CUDA/MPS.

The guard: the tiny model is built on the CPU, then the library runs under
`torch.set_default_device("meta")`.  A tensor created without `device=` lands on `meta`; mixing it with
the model's CPU tensors raises, and reading it (`.tolist()`, `.cpu()`) raises too, so any such tensor on a
path the test runs fails the test.  `test_the_guard_catches_a_tensor_made_without_a_device` shows it
catching the bug this audit fixed (`torch.zeros(L, d, requires_grad=True)` in attribution's clean row).
Also here: `load_model(device=..., dtype=...)` and the CLI's --device/--dtype, and half precision with
float32 accumulation.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from cli_support import fact_argv, save_model_folder
from tiny_models import tiny_model

from dkn.attribution import BASELINES, METHODS, AttributionParams, attribute
from dkn.integration import RULES
from dkn.interventions import MODES, intervene, intervene_many
from dkn.neurons import Neuron

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, ANSWER = "the capital of france is", "paris"


@contextmanager
def no_implicit_device():
    """Tensors made without an explicit device land on `meta` for the duration."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_guard_catches_a_tensor_made_without_a_device():
    cpu = torch.ones(4, 3)  # like the model's tensors
    with no_implicit_device():
        implicit = torch.zeros(4, 3, requires_grad=True)  # the old attribution._path_grads line
        assert implicit.device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            cpu + implicit  # mixing raises
        with pytest.raises((RuntimeError, NotImplementedError)):
            torch.tensor([0, 1]).tolist()  # reading one raises
        explicit = torch.zeros(4, 3, device=cpu.device)  # the fix
        assert (cpu + explicit).device == cpu.device
    assert torch.zeros(1).device.type == "cpu"  # the guard is undone


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("baseline", BASELINES)
def test_attribution_makes_no_tensor_without_a_device(llama, method, baseline):
    rules = RULES if method == "ig" else ("midpoint",)
    for rule in rules:
        steps = 4 if rule == "adaptive" else 3  # the adaptive rule halves its intervals: an even count
        params = AttributionParams(method=method, steps=steps, rule=rule, baseline=baseline)
        expected = attribute(llama, PROMPT, "paris new", params)
        with no_implicit_device():
            fast = attribute(llama, PROMPT, "paris new", params, max_rows=4)
            loop = None if rule == "adaptive" else attribute(llama, PROMPT, "paris new", params, reference_loop=True)
        np.testing.assert_allclose(fast.scores, expected.scores, rtol=1e-4, atol=1e-6)
        if loop is not None:  # the reference loop runs fixed rules only
            atol = 1e-5 * np.abs(expected.scores).max()
            np.testing.assert_allclose(loop.scores, expected.scores, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "bert"])
def test_attribution_on_other_families_makes_no_tensor_without_a_device(family):
    lm = tiny_model(family)
    params = AttributionParams(steps=3, rule="linspace", baseline="amig")
    expected = attribute(lm, PROMPT, ANSWER, params)
    with no_implicit_device():
        got = attribute(lm, PROMPT, ANSWER, params)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_interventions_make_no_tensor_without_a_device(family):
    lm = tiny_model(family)
    sets = [[(0, 1), (2, 3)], [(1, 0)], []]
    for mode in MODES:
        for factor in (0.0, 2.0):
            expected = intervene_many(lm, PROMPT, ANSWER, sets, factor, mode)
            with no_implicit_device():
                got = intervene_many(lm, PROMPT, ANSWER, sets, factor, mode)
                single = intervene(lm, PROMPT, ANSWER, sets[0], factor, mode, top_k=3)
            assert got[0] == pytest.approx(expected[0], rel=1e-5)
            np.testing.assert_allclose(got[1], expected[1], rtol=1e-5)
            assert single.prob_after == pytest.approx(expected[1][0], rel=1e-4)


def test_degeneracy_analysis_makes_no_tensor_without_a_device(llama):
    from dkn.degeneracy import DegeneracyParams, analyse

    neurons = [Neuron(0, 1), Neuron(1, 4), Neuron(1, 5), Neuron(2, 7)]
    scores = [0.4, 0.3, 0.2, 0.1]
    expected = analyse(llama, PROMPT, ANSWER, neurons, scores, DegeneracyParams(random_seeds=2))
    with no_implicit_device():
        got = analyse(llama, PROMPT, ANSWER, neurons, scores, DegeneracyParams(random_seeds=2))
    assert got.union_drop == pytest.approx(expected.union_drop, rel=1e-5)
    assert got.single_drops == pytest.approx(expected.single_drops, rel=1e-5)


def test_fine_tuning_makes_no_tensor_without_a_device():
    from dkn.finetune import train_neurons

    pairs = [("the capital of france is", "paris"), ("the capital of italy is", "rome")]
    neurons = [Neuron(1, 2), Neuron(2, 3)]
    expected = train_neurons(tiny_model("llama"), pairs, neurons, steps=2, lr=1e-2, seed=0)
    lm = tiny_model("llama")
    with no_implicit_device():
        got = train_neurons(lm, pairs, neurons, steps=2, lr=1e-2, seed=0)
    np.testing.assert_allclose(got.losses, expected.losses, rtol=1e-5)


# -- --device / --dtype ------------------------------------------------------------------------------
def _saved_tiny(tmp_path, family="llama"):
    lm = tiny_model(family)
    return lm, save_model_folder(lm, tmp_path / f"tiny-{family}")


def test_half_precision_weights_accumulate_in_float32(tmp_path):
    from dkn.forward import AnswerPositionRunner
    from dkn.models import load_model

    full, folder = _saved_tiny(tmp_path)
    half = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([half.tokenizer(PROMPT)["input_ids"]])
    assert AnswerPositionRunner(half, ids).staggered  # the fast path stays on in bf16
    params = AttributionParams(steps=8)
    reference = attribute(full, PROMPT, ANSWER, params).scores
    scores = attribute(half, PROMPT, ANSWER, params).scores
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert np.corrcoef(scores.ravel(), reference.ravel())[0, 1] > 0.99


def test_device_and_dtype_are_checked_with_a_clear_message():
    from dkn.models import ModelLoadError, resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU.*device cpu or auto"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_a_gpu_exits_2_with_a_message(tmp_path, capsys):
    from dkn.cli import main

    _, folder = _saved_tiny(tmp_path)
    code = main(fact_argv("attribute", folder, PROMPT, ANSWER, "--no-cache", device="cuda"))
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA GPU" in err and "Traceback" not in err


def test_cli_dtype_flag_loads_half_precision(tmp_path, capsys):
    import json

    from dkn.cli import main

    _, folder = _saved_tiny(tmp_path)
    args = fact_argv("attribute", folder, PROMPT, ANSWER, "--no-cache", "--steps", "2", "--json")
    capsys.readouterr()
    assert main([*args, "--dtype", "bfloat16"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out)
    assert half["prob"] == pytest.approx(full["prob"], rel=0.05) and half["prob"] != full["prob"]


# -- models bigger than one device: accelerate's device_map / offload -------------------------------------
def _dispatched_by_hand(tmp_path, family):
    """The tiny model with its first block on the CPU and the others offloaded to disk (accelerate)."""
    from accelerate import dispatch_model

    lm = tiny_model(family)
    blocks = lm.family.layers
    device_map = {name: "cpu" for name, _ in lm.model.named_children()}
    if family == "llama":
        device_map = {
            "model.embed_tokens": "cpu",
            f"{blocks}.0": "cpu",
            f"{blocks}.1": "disk",
            f"{blocks}.2": "disk",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        }
    else:  # gpt2
        device_map = {
            "transformer.wte": "cpu",
            "transformer.wpe": "cpu",
            f"{blocks}.0": "disk",
            f"{blocks}.1": "cpu",
            f"{blocks}.2": "disk",
            "transformer.ln_f": "cpu",
            "lm_head": "cpu",
        }
    dispatch_model(lm.model, device_map=device_map, offload_dir=str(tmp_path / f"offload-{family}"))
    return lm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_offloaded_model_gives_the_same_attribution_and_interventions(tmp_path, family):
    plain = tiny_model(family)
    lm = _dispatched_by_hand(tmp_path, family)
    assert lm.dispatched and any(p.device.type == "meta" for p in lm.model.parameters())
    assert lm.device == torch.device("cpu") and lm.fingerprint == plain.fingerprint
    from dkn.models import fingerprint

    assert fingerprint(lm.model) == plain.fingerprint  # offloaded weights are read for the fingerprint
    from dkn.forward import AnswerPositionRunner

    assert AnswerPositionRunner(lm, torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])).staggered
    adaptive = AttributionParams(steps=4)  # the default rule: the fast path only (no reference loop)
    np.testing.assert_allclose(
        attribute(lm, PROMPT, "paris new", adaptive).scores,
        attribute(plain, PROMPT, "paris new", adaptive).scores,
        rtol=1e-5,
        atol=1e-7,
    )
    for params in (
        AttributionParams(steps=4, rule="trapezoid"),
        AttributionParams(steps=3, rule="trapezoid", baseline="amig"),
        AttributionParams(method="grad_x_act"),
    ):
        expected = attribute(plain, PROMPT, "paris new", params).scores
        np.testing.assert_allclose(attribute(lm, PROMPT, "paris new", params).scores, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            attribute(lm, PROMPT, "paris new", params, reference_loop=True).scores,
            expected,
            rtol=1e-4,
            atol=1e-5 * np.abs(expected).max(),
        )
    sets = [[(0, 1), (2, 3)], [(1, 0)], [(2, 5), (1, 7)]]  # neurons in offloaded and resident blocks
    for mode in MODES:
        for factor in (0.0, 2.0):
            clean, probs = intervene_many(plain, PROMPT, ANSWER, sets, factor, mode)
            got_clean, got = intervene_many(lm, PROMPT, ANSWER, sets, factor, mode)
            assert got_clean == pytest.approx(clean, rel=1e-5)
            np.testing.assert_allclose(got, probs, rtol=1e-4, err_msg=f"{mode} x{factor}")
            assert np.ptp(got) > 0


def test_load_model_auto_dispatches_what_does_not_fit(tmp_path):
    from dkn.models import load_model

    plain, folder = _saved_tiny(tmp_path)
    lm = load_model(str(folder), device="auto", max_memory={"cpu": 40_000}, offload_folder=tmp_path / "offload")
    assert lm.dispatched and any(p.device.type == "meta" for p in lm.model.parameters())
    assert lm.fingerprint == plain.fingerprint
    expected = attribute(plain, PROMPT, ANSWER, AttributionParams(steps=4)).scores
    np.testing.assert_allclose(
        attribute(lm, PROMPT, ANSWER, AttributionParams(steps=4)).scores, expected, rtol=1e-5, atol=1e-7
    )
    for mode in MODES:
        assert intervene(lm, PROMPT, ANSWER, [(1, 3), (2, 0)], 2.0, mode).prob_after == pytest.approx(
            intervene(plain, PROMPT, ANSWER, [(1, 3), (2, 0)], 2.0, mode).prob_after, rel=1e-4
        )
    fitting = load_model(str(folder), device="auto")  # fits: one device, no accelerate hooks
    assert not fitting.dispatched


@pytest.mark.real_model
def test_bf16_scores_correlate_with_float32_on_the_default_model(default_lm):
    """Half-precision weights, float32 accumulation: the default model's top neurons keep their scores."""
    from dkn.models import load_model

    half = load_model("default", device="cpu", dtype="bfloat16")
    params = AttributionParams(steps=4)
    full = attribute(default_lm, "The capital of France is", "Paris", params).scores
    scores = attribute(half, "The capital of France is", "Paris", params).scores
    assert scores.dtype == np.float32
    top = np.argsort(np.abs(full), axis=None)[::-1][:200]  # the top neurons by |score|
    corr = np.corrcoef(full.ravel()[top], scores.ravel()[top])[0, 1]
    assert corr > 0.99, corr
