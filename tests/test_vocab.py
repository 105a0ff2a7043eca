"""dkn.vocab: a neuron's output vector read through the head and the unembedding."""

import pytest
import torch

from dkn.neurons import Neuron
from dkn.vocab import neuron_logits, project_neuron
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_projection_matches_hand_computation_without_norm(family):
    lm = tiny_model(family)
    n = Neuron(1, 3)
    expected = (lm.unembedding() @ lm.output_vectors(1)[3]).detach()  # [vocab]
    torch.testing.assert_close(neuron_logits(lm, n, through_norm=False), expected.float())
    promoted, demoted = project_neuron(lm, n, k=3, through_norm=False)
    assert promoted[0][1] == pytest.approx(float(expected.max()), rel=1e-5)
    assert demoted[0][1] == pytest.approx(float(expected.min()), rel=1e-5)
    assert [v for _, v in promoted] == sorted([v for _, v in promoted], reverse=True)
    assert [v for _, v in demoted] == sorted(v for _, v in demoted)


def test_rms_norm_keeps_direction_times_weight():
    lm = tiny_model("llama")
    norm = lm.model.get_submodule("model.norm")
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
    v = lm.output_vectors(0)[2].detach()
    expected = lm.unembedding() @ (v * norm.weight)
    got = neuron_logits(lm, Neuron(0, 2))
    # the norm rescales by a positive constant: same ranking, proportional logits
    ratio = got / expected.detach()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)
    assert ratio[0] > 0


def test_out_of_range_neuron_is_a_value_error():
    lm = tiny_model("gpt2")
    with pytest.raises(ValueError, match="out of range"):
        project_neuron(lm, Neuron(99, 0))
