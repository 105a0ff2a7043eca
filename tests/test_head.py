"""`LoadedModel.through_head` / `head_logits`: the one walk from the last block's output to the logits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CAUSAL_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_head_logits_reproduce_the_models_logits(family, models):
    lm = models(family)
    ids = torch.tensor([lm.tokenizer("the capital of france is")["input_ids"]], device=lm.device)  # [1, T]
    captured = {}

    def keep(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output  # [1, T, d_model]

    handle = lm.blocks[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits  # [1, T, vocab]
    finally:
        handle.remove()
    with torch.no_grad():
        mine = lm.head_logits(captured["h"])
        skipped = lm.model.get_output_embeddings()(captured["h"])  # no head at all
    torch.testing.assert_close(mine, logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(skipped, logits, atol=1e-3)  # the head matters: the test can fail
