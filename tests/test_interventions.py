"""dkn.interventions against the same interventions written here with plain torch hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from dkn.interventions import intervene, intervene_many, scaled_weights
from dkn.neurons import Neuron

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, ANSWER = "the capital of france is", "paris"
FAMILIES = ["gpt2", "llama", "opt", "gpt_neox", "gemma3_text", "bert"]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_model(request.param)


# -- plain-torch reference -------------------------------------------------------------------------
def _steps(lm, prompt, answer):
    """[(ids [1, T], position, target)] per answer token, conditioned on the gold prefix."""
    tok = lm.tokenizer
    words = answer.split()
    if lm.family.masked_lm:
        targets = [tok.convert_tokens_to_ids(w) for w in words]
        ids = tok(prompt + " " + " ".join([tok.mask_token] * len(words)) + ".")["input_ids"]
        masks = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
        steps = []
        for k, (pos, target) in enumerate(zip(masks, targets)):
            filled = list(ids)
            for j in range(k):
                filled[masks[j]] = targets[j]
            steps.append((torch.tensor([filled]), pos, target))
        return steps
    ids = tok(prompt)["input_ids"]
    steps = []
    for w in words:
        target = tok.convert_tokens_to_ids(w)
        steps.append((torch.tensor([ids]), len(ids) - 1, target))
        ids = ids + [target]
    return steps


def _plain_prob(lm, neurons, factor, mode, prompt=PROMPT, answer=ANSWER, mlp_output=None):
    """P(answer) with `neurons` scaled by `factor` at the answer position ("last") or everywhere ("all"),
    through forward pre-hooks on the down projections; mlp_output: layer -> fn(output) forward hooks."""
    by_layer: dict[int, list[int]] = {}
    for layer, index in neurons:
        by_layer.setdefault(layer, []).append(index)
    prob = 1.0
    for ids, pos, target in _steps(lm, prompt, answer):
        handles = []
        for layer, idx in by_layer.items():

            def pre(module, args, idx=idx, pos=pos, T=ids.shape[1]):
                x = args[0]
                h = x.reshape(1, T, x.shape[-1]).clone()  # OPT hands fc2 a [T, d_mlp] matrix
                if mode == "last":
                    h[0, pos, idx] *= factor
                else:
                    h[0, :, idx] *= factor
                return (h.reshape(x.shape),)

            handles.append(lm.down_proj(layer).register_forward_pre_hook(pre))
        for layer, fn in (mlp_output or {}).items():
            handles.append(lm.down_proj(layer).register_forward_hook(lambda m, a, out, fn=fn: fn(m, out)))
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits[0, pos]
        finally:
            for h in handles:
                h.remove()
        prob *= float(logits.float().softmax(-1)[target])
    return prob


def _sets(lm):
    d, L = lm.d_mlp, lm.n_layers
    return [
        [(0, 1)],
        [(L - 1, 3), (1, 5)],
        [],  # nothing scaled: a row that starts after the last block
        [(2, d - 1), (0, 0), (0, 7)],
        [(1, i) for i in range(0, d, 3)],
        [(L - 1, 2)],
    ]


# -- batched vs single vs plain ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["last", "all"])
@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_batched_equals_single_equals_plain(lm, mode, factor):
    sets = _sets(lm)
    before, batched = intervene_many(lm, PROMPT, ANSWER, sets, factor, mode)
    assert batched.shape == (len(sets),)
    assert before == pytest.approx(_plain_prob(lm, [], 1.0, mode), rel=1e-5)
    for neurons, got in zip(sets, batched):
        single = intervene(lm, PROMPT, ANSWER, neurons, factor, mode)
        plain = _plain_prob(lm, neurons, factor, mode)
        assert single.prob_before == pytest.approx(before, rel=1e-5)
        assert single.prob_after == pytest.approx(plain, rel=1e-4, abs=1e-9), neurons
        assert got == pytest.approx(plain, rel=1e-4, abs=1e-9), neurons
        assert single.neurons == tuple(Neuron(*n) for n in neurons)
    assert batched[2] == pytest.approx(before, rel=1e-5)
    assert np.ptp(batched) > 0  # the sets do different things


@pytest.mark.parametrize("mode", ["last", "all", "weights"])
def test_one_factor_per_set_equals_each_set_at_its_own_factor(lm, mode):
    """A per-set factor list (the dose-response's one pass) gives what each set at its factor gives alone;
    the rows are not simply the same factor (the list is checked for length and finiteness)."""
    sets = _sets(lm)
    factors = [0.0, 2.0, 3.0, -1.0, 0.5, 1.5]
    before, batched = intervene_many(lm, PROMPT, ANSWER, sets, factors, mode)
    assert before == pytest.approx(_plain_prob(lm, [], 1.0, mode), rel=1e-5)
    for neurons, f, got in zip(sets, factors, batched):
        assert got == pytest.approx(_plain_prob(lm, neurons, f, mode), rel=1e-4, abs=1e-9), (neurons, f)
    _, same = intervene_many(lm, PROMPT, ANSWER, sets, 0.0, mode)
    assert not np.allclose(same, batched)  # the factors did differ per row
    with pytest.raises(ValueError, match="one per set"):
        intervene_many(lm, PROMPT, ANSWER, sets, factors[:-1], mode)
    with pytest.raises(ValueError, match="finite"):
        intervene_many(lm, PROMPT, ANSWER, sets, [*factors[:-1], float("inf")], mode)


@pytest.mark.parametrize("mode", ["all", "last"])
def test_full_rows_in_small_passes_change_nothing(lm, mode, monkeypatch):
    """Full-prompt rows run in passes bounded by the memory budget: one row per pass gives the same P."""
    from dkn import interventions

    sets = _sets(lm)
    factors = [0.0, 2.0, 3.0, -1.0, 0.5, 1.5]
    monkeypatch.setattr(interventions, "answer_runner", lambda lm_, step: None)  # "last" on full rows too
    _, whole = intervene_many(lm, PROMPT, ANSWER, sets, factors, mode)
    monkeypatch.setattr(interventions, "rows_per_pass", lambda lm_, tokens, context: 1)
    _, one_by_one = intervene_many(lm, PROMPT, ANSWER, sets, factors, mode)
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-5, atol=1e-9)


def test_multi_token_answer_is_gold_prefix_conditioned(lm):
    neurons = [(0, 2), (lm.n_layers - 1, 4)]
    for mode in ("last", "all"):
        result = intervene(lm, PROMPT, "new york", neurons, 0.0, mode)
        assert result.prob_before == pytest.approx(_plain_prob(lm, [], 1.0, mode, answer="new york"), rel=1e-5)
        assert result.prob_after == pytest.approx(
            _plain_prob(lm, neurons, 0.0, mode, answer="new york"), rel=1e-4, abs=1e-12
        )
        _, many = intervene_many(lm, PROMPT, "new york", [neurons], 0.0, mode)
        assert many[0] == pytest.approx(result.prob_after, rel=1e-5, abs=1e-12)


def test_factor_one_changes_nothing(lm):
    neurons = _sets(lm)[3]
    for mode in ("last", "all", "weights"):
        r = intervene(lm, PROMPT, ANSWER, neurons, 1.0, mode)
        assert r.prob_after == pytest.approx(r.prob_before, rel=1e-5)
        assert [t for t, _ in r.top_after] == [t for t, _ in r.top_before]
        assert r.relative_change == pytest.approx(0.0, abs=1e-5)


def test_top_tokens_and_relative_change(lm):
    r = intervene(lm, PROMPT, ANSWER, [(0, 1), (1, 2)], 0.0, "last", top_k=5)
    assert len(r.top_before) == len(r.top_after) == 5
    probs = [p for _, p in r.top_before]
    assert probs == sorted(probs, reverse=True)
    ids, pos, _ = _steps(lm, PROMPT, ANSWER)[0]
    with torch.no_grad():
        dist = lm.model(input_ids=ids).logits[0, pos].softmax(-1)
    values, top = dist.topk(5)
    assert [t for t, _ in r.top_before] == [lm.tokenizer.decode([int(i)]) for i in top]
    assert probs == pytest.approx(values.tolist(), rel=1e-5)
    assert r.relative_change == pytest.approx((r.prob_after - r.prob_before) / r.prob_before)


# -- whole-layer suppression and the weights mode -----------------------------------------------------
def test_suppressing_a_whole_layer_leaves_the_down_projection_bias(lm):
    layer = 1
    everything = [(layer, i) for i in range(lm.d_mlp)]
    down = lm.down_proj(layer)
    has_bias = getattr(down, "bias", None) is not None
    assert has_bias == (lm.family.name not in ("llama", "gemma"))

    def only_bias(module, out):
        return torch.zeros_like(out) + (module.bias if module.bias is not None else 0.0)

    expected = _plain_prob(lm, [], 1.0, "all", mlp_output={layer: only_bias})
    clean = _plain_prob(lm, [], 1.0, "all")
    got = intervene(lm, PROMPT, ANSWER, everything, 0.0, "all")
    assert got.prob_after == pytest.approx(expected, rel=1e-4)
    assert got.prob_after != pytest.approx(clean, rel=1e-3)
    weights = intervene(lm, PROMPT, ANSWER, everything, 0.0, "weights")
    assert weights.prob_after == pytest.approx(expected, rel=1e-4)


def _snapshot(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _assert_bit_identical(lm, snapshot):
    now = lm.model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), k


def test_weights_restored_bit_for_bit(lm):
    snapshot = _snapshot(lm)
    neurons = [(0, 1), (0, 1), (lm.n_layers - 1, lm.d_mlp - 1), (1, 3)]  # a repeated neuron too
    for factor in (0.0, 2.0, 0.37):
        intervene(lm, PROMPT, ANSWER, neurons, factor, "weights")
        _assert_bit_identical(lm, snapshot)

    class Boom(Exception):
        pass

    down = lm.down_proj(0)
    with pytest.raises(Boom):
        with scaled_weights(lm, [Neuron(*n) for n in neurons], 3.0):
            changed = not torch.equal(down.weight, snapshot[_param_name(lm, down.weight)])
            raise Boom
    assert changed  # the context did change the weights while it was open
    _assert_bit_identical(lm, snapshot)


def _param_name(lm, param):
    (name,) = [n for n, p in lm.model.named_parameters() if p is param]
    return name


def test_scaled_weights_scale_only_the_output_column(lm):
    """Inside the context the neuron's output vector is scaled, nothing else: its input vectors (and
    biases) stay, so the neuron's contribution is linear in the factor."""
    layer, index = 1, 5
    out_before = lm.output_vectors(layer).detach().clone()  # [d_mlp, d_model]
    in_before = [m.detach().clone() for m in lm.input_vectors(layer)]
    with scaled_weights(lm, [Neuron(layer, index)], 3.0):
        out_during = lm.output_vectors(layer).detach().clone()
        in_during = [m.detach().clone() for m in lm.input_vectors(layer)]
    expected = out_before.clone()
    expected[index] *= 3.0
    torch.testing.assert_close(out_during, expected, rtol=0, atol=0)
    for before, during in zip(in_before, in_during):
        torch.testing.assert_close(during, before, rtol=0, atol=0)


@pytest.mark.parametrize("factor", [0.0, 2.0, 3.5])
def test_weights_mode_equals_all_mode_for_suppression_and_amplification(lm, factor):
    """Scaling the output column by f is scaling the activation by f at every position (the old
    weights mode, which also scaled the input rows, gave ~f^2 or f^3 instead and failed for f = 2)."""
    sets = _sets(lm)
    for neurons in sets:
        all_mode = intervene(lm, PROMPT, ANSWER, neurons, factor, "all").prob_after
        weights = intervene(lm, PROMPT, ANSWER, neurons, factor, "weights").prob_after
        assert weights == pytest.approx(all_mode, rel=1e-4, abs=1e-9), neurons
    _, many = intervene_many(lm, PROMPT, ANSWER, sets, factor, "weights")
    _, many_all = intervene_many(lm, PROMPT, ANSWER, sets, factor, "all")
    np.testing.assert_allclose(many, many_all, rtol=1e-4, atol=1e-9)


# -- direction of the effect -------------------------------------------------------------------------
def _act_times_grad(lm):
    """[L, d_mlp]: activation x dP/dh at the answer position (all layers free), plain autograd."""
    ((ids, pos, target),) = _steps(lm, PROMPT, ANSWER)
    kept, handles = {}, []
    for layer in range(lm.n_layers):

        def pre(module, args, layer=layer, T=ids.shape[1]):
            h = args[0]
            h.retain_grad()
            kept[layer] = h

        handles.append(lm.down_proj(layer).register_forward_pre_hook(pre))
    try:
        logits = lm.model(input_ids=ids).logits[0, pos]
        logits.softmax(-1)[target].backward()
    finally:
        for h in handles:
            h.remove()
        lm.model.zero_grad(set_to_none=True)
    T = ids.shape[1]
    return torch.stack([(kept[l] * kept[l].grad).detach().reshape(1, T, -1)[0, pos] for l in range(lm.n_layers)])


def test_amplification_moves_probability_as_the_gradient_predicts(lm):
    score = _act_times_grad(lm).numpy()
    for flat in np.argsort(-np.abs(score), axis=None)[:3]:
        layer, index = (int(v) for v in np.unravel_index(flat, score.shape))
        amp = intervene(lm, PROMPT, ANSWER, [(layer, index)], 2.0, "last")
        sup = intervene(lm, PROMPT, ANSWER, [(layer, index)], 0.0, "last")
        assert np.sign(amp.prob_after - amp.prob_before) == np.sign(score[layer, index]), (layer, index)
        assert amp.prob_after != pytest.approx(sup.prob_after, rel=1e-3)


# -- errors ------------------------------------------------------------------------------------------
def test_out_of_range_neurons_are_rejected(lm):
    L, d = lm.n_layers, lm.d_mlp
    for bad in [(L, 0), (0, d), (-1, 0), (0, -1)]:
        with pytest.raises(ValueError, match=r"out of range") as err:
            intervene(lm, PROMPT, ANSWER, [(0, 0), bad])
        message = str(err.value)
        assert f"{bad[0]}:{bad[1]}" in message
        assert f"layers 0..{L - 1}" in message and f"neurons 0..{d - 1}" in message
        with pytest.raises(ValueError, match=r"out of range"):
            intervene_many(lm, PROMPT, ANSWER, [[(0, 0)], [bad]])


def test_unknown_mode_is_rejected(lm):
    for call in (
        lambda: intervene(lm, PROMPT, ANSWER, [(0, 0)], 0.0, "everywhere"),
        lambda: intervene_many(lm, PROMPT, ANSWER, [[(0, 0)]], 0.0, "first"),
    ):
        with pytest.raises(ValueError, match=r"unknown intervention mode .*last, all, weights"):
            call()


def test_a_repeated_neuron_is_scaled_once_in_weights_mode():
    lm = tiny_model("gpt2")
    once = intervene(lm, PROMPT, ANSWER, [(0, 1)], 2.0, "weights").prob_after
    twice = intervene(lm, PROMPT, ANSWER, [(0, 1), (0, 1)], 2.0, "weights").prob_after
    for mode in ("last", "all"):  # the other modes do scale it once
        assert intervene(lm, PROMPT, ANSWER, [(0, 1), (0, 1)], 2.0, mode).prob_after == pytest.approx(
            intervene(lm, PROMPT, ANSWER, [(0, 1)], 2.0, mode).prob_after, rel=1e-6
        )
    assert twice == pytest.approx(once, rel=1e-5)


def test_runners_and_checks_are_kept_on_the_model_and_bounded():
    """The per-prompt runners (and the staggered-pass checks) live on the LoadedModel, not in a module-level
    dict keyed by id(model): another model never sees them, and at most RUNNER_CACHE_SIZE are kept."""
    from tiny_models import WORDS

    from dkn.forward import RUNNER_CACHE_SIZE

    lm, other = tiny_model("llama"), tiny_model("llama")
    intervene_many(lm, PROMPT, ANSWER, [[(0, 1)]], 0.0, "last")
    assert len(lm.runners) == 1 and len(other.runners) == 0 and not other.staggered_checks
    assert lm.staggered_checks and all(lm.staggered_checks.values())
    (runner,) = lm.runners.values()
    intervene(lm, PROMPT, ANSWER, [(1, 2)], 2.0, "last")
    assert list(lm.runners.values()) == [runner]  # reused, not rebuilt
    for word in WORDS[: RUNNER_CACHE_SIZE + 3]:
        intervene_many(lm, f"the capital of {word} is", ANSWER, [[(0, 1)]], 0.0, "last")
    assert len(lm.runners) == RUNNER_CACHE_SIZE
