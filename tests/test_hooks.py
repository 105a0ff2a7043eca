"""dkn.hooks: hooks exist only inside the context managers, see [batch, pos, d_mlp], hold the lock."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_model

from dkn.hooks import edit_neurons, record_neurons

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the capital of france is paris and the capital of germany is"


def _ids(lm, batch: int = 1) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    return ids.expand(batch, -1).clone()


def _hooked_modules(lm):
    for layer in range(lm.n_layers):
        yield lm.blocks[layer]
        yield lm.down_proj(layer)
        yield lm.pre_activation(layer)


def _assert_no_hooks(lm):
    for module in _hooked_modules(lm):
        assert len(module._forward_pre_hooks) == 0, module
        assert len(module._forward_hooks) == 0, module


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def lm(request):
    return tiny_model(request.param)


def test_hooks_removed_after_normal_exit(lm):
    ids = _ids(lm)
    clean = _logits(lm, ids)
    _assert_no_hooks(lm)
    for site in ("post", "pre"):
        with edit_neurons(lm, {0: lambda h: h * 0.0, lm.n_layers - 1: lambda h: h + 1.0}, site):
            assert any(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in _hooked_modules(lm))
            edited = _logits(lm, ids)
        assert not torch.allclose(edited, clean)  # the hooks did act while present
        _assert_no_hooks(lm)
        assert torch.equal(_logits(lm, ids), clean)  # and leave no trace
        with record_neurons(lm, site=site) as rec:
            _logits(lm, ids)
        assert sorted(rec) == list(range(lm.n_layers))
        _assert_no_hooks(lm)
        assert torch.equal(_logits(lm, ids), clean)


def test_hooks_removed_after_exception(lm):
    ids = _ids(lm)
    clean = _logits(lm, ids)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with edit_neurons(lm, {layer: (lambda h: -h) for layer in range(lm.n_layers)}):
            _logits(lm, ids)
            raise Boom
    _assert_no_hooks(lm)
    with pytest.raises(Boom):
        with record_neurons(lm, site="pre"):
            raise Boom
    _assert_no_hooks(lm)

    def failing_edit(h):
        raise Boom  # an exception inside the forward pass itself

    with pytest.raises(Boom):
        with edit_neurons(lm, {1: failing_edit}):
            _logits(lm, ids)
    _assert_no_hooks(lm)
    assert torch.equal(_logits(lm, ids), clean)


def test_bad_site_leaves_no_hooks(lm):
    with pytest.raises(ValueError, match="site"):
        with edit_neurons(lm, {0: lambda h: h, 1: lambda h: h}, site="middle"):
            pass
    _assert_no_hooks(lm)


def _plain_down_inputs(lm, ids):
    """layer -> down_proj input [batch, pos, d_mlp], recorded with plain torch hooks."""
    captured, handles = {}, []
    B, T = ids.shape
    for layer in range(lm.n_layers):

        def hook(module, args, layer=layer):
            captured[layer] = args[0].detach().reshape(B, T, -1)  # OPT flattens to [B * T, d_mlp]

        handles.append(lm.down_proj(layer).register_forward_pre_hook(hook))
    try:
        _logits(lm, ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def test_record_shapes_and_values(lm):
    ids = _ids(lm, batch=2)
    B, T = ids.shape
    with record_neurons(lm) as rec:
        _logits(lm, ids)
    expected = _plain_down_inputs(lm, ids)
    d_mlp = _config_d_mlp(lm)
    assert lm.d_mlp == d_mlp
    for layer in range(lm.n_layers):
        assert rec[layer].shape == (B, T, d_mlp)
        torch.testing.assert_close(rec[layer], expected[layer], rtol=0, atol=0)
    with record_neurons(lm, layers=[1], site="pre") as rec_pre:
        _logits(lm, ids)
    assert list(rec_pre) == [1]
    assert rec_pre[1].shape[:2] == (B, T)


def _config_d_mlp(lm) -> int:
    """The MLP width as the tiny config states it (GPT-2 and GPT-J leave n_inner unset: 4 * width)."""
    ((_, _, kwargs),) = [v for k, v in FAMILY_CONFIGS.items() if lm.name == f"tiny-{k}-0"]
    return kwargs.get("intermediate_size") or kwargs.get("ffn_dim") or 4 * kwargs["n_embd"]


def test_opt_flattened_hidden_is_presented_as_3d():
    lm = tiny_model("opt")
    ids = _ids(lm, batch=2)
    B, T = ids.shape
    raw, seen = {}, {}

    def edit(h):
        seen["shape"] = tuple(h.shape)
        h = h.clone()
        h[1, -1] = 0.0  # second prompt, last position only
        return h

    with edit_neurons(lm, {1: edit}):
        # registered after dkn's hook, so it sees what fc2 really receives
        handle = lm.down_proj(1).register_forward_pre_hook(lambda m, args: raw.setdefault("x", args[0].detach()))
        try:
            _logits(lm, ids)
        finally:
            handle.remove()
    assert seen["shape"] == (B, T, 72)  # ffn_dim of the tiny OPT config
    assert raw["x"].dim() == 2 and raw["x"].shape == (B * T, 72)  # OPT really flattens inside the block
    flat = raw["x"]  # the edited input, as fc2 received it
    assert torch.all(flat[2 * T - 1] == 0)  # row (batch 1, position T-1) of the flattened matrix
    assert torch.any(flat[T - 1] != 0)  # batch 0 untouched
    assert torch.any(flat[2 * T - 2] != 0)  # batch 1, other positions untouched


def test_lock_is_held_inside_the_context():
    lm = tiny_model("gpt2")
    entered = threading.Event()

    def other_thread():
        with edit_neurons(lm, {0: lambda h: h}):
            entered.set()

    for context in (lambda: edit_neurons(lm, {0: lambda h: h}), lambda: record_neurons(lm)):
        entered.clear()
        with context():
            acquired = []
            probe = threading.Thread(target=lambda acquired=acquired: acquired.append(lm.lock.acquire(blocking=False)))
            probe.start()
            probe.join()
            assert acquired == [False]
            worker = threading.Thread(target=other_thread)
            worker.start()
            assert not entered.wait(0.3), "a second thread entered while the first held the hooks"
        worker.join(10)
        assert entered.is_set(), "the second thread never got in after the first left"
        _assert_no_hooks(lm)
