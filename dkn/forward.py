"""Fast batched forward passes at the answer position.

Attribution and interventions evaluate many variants ("rows") of one prompt
that differ only at the answer position, from some layer upwards.  Two savings
make that cheap:

1. The prompt's prefix is run once; each row is a single token over a copy of
   its key/value cache.
2. A row whose first edit is at layer s is identical to the clean run below s,
   so it starts at block s from the clean residual stream: rows are sorted by
   start layer and block j runs only the rows that have started by then.  With
   one row per layer this halves the work.

3. In the staggered pass the prefix's keys and values are never copied per row:
   a registered attention function ("dkn_shared_prefix") attends each row's
   query to the shared, un-expanded prefix keys plus the row's own new key.

`AnswerPositionRunner.logits(row_start, edits)` returns the answer-position
logits of every row.  The staggered path replays each block with the
arguments it received in a clean run and finishes with the family's head
modules; it is checked once against the model's own logits and, if they ever
disagree (an architecture variant we do not know), dkn falls back to running
every row through the whole model, which is always right.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import sys
import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dkn.hooks import Edit, edit_neurons, record_neurons
from dkn.models import LoadedModel

log = logging.getLogger(__name__)
RUNNER_CACHE_SIZE = 16  # runners kept per model (live interventions reuse them)


_IN_PREFIX_RUN: contextvars.ContextVar = contextvars.ContextVar("dkn_in_prefix_run", default=False)
_NO_KEPT_RUNNERS: contextvars.ContextVar = contextvars.ContextVar("dkn_no_kept_runners", default=False)


@contextmanager
def _raised(flag: contextvars.ContextVar):
    """`flag` is True within the block (in this thread or task only)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def no_kept_runners():
    """Within the block, answer_runner neither reuses nor keeps runners: a runner bakes the hooks active when
    it was built into its prefix cache and clean capture, so one built under a suppression (dkn.backup.
    suppressed) must not serve a later unsuppressed request, nor an unsuppressed one a suppressed request."""
    return _raised(_NO_KEPT_RUNNERS)


def in_prefix_run() -> bool:
    """True while a runner computes its prompt's prefix (every token before the answer position): hooks that
    act at the answer position only skip that pass (dkn.backup.suppressed with mode "last")."""
    return _IN_PREFIX_RUN.get()


class AnswerPositionRunner:
    """Rows that share a causal prompt and differ at its last position (the answer position)."""

    def __init__(self, lm: LoadedModel, input_ids: torch.Tensor, site: str = "post"):
        assert not lm.family.masked_lm and input_ids.shape[0] == 1  # input_ids: [1, T]
        self.lm, self.site = lm, site
        self.last = input_ids[:, -1:]  # [1, 1]
        with torch.no_grad(), lm.lock:
            with _raised(_IN_PREFIX_RUN):
                self.prefix = (
                    lm.model.base_model(input_ids=input_ids[:, :-1], cache=empty_cache(lm), use_cache=True).cache
                    if input_ids.shape[1] > 1
                    else None
                )  # no head needed
            self.block_inputs, self.block_calls, self.clean_logits, self.clean_acts = self._capture()
        key = (site, input_ids.shape[1])
        if key not in lm.staggered_checks:  # the replay depends on the architecture and the prompt length only
            lm.staggered_checks[key] = self._head_reproduces_logits()
        self.staggered = lm.staggered_checks[key]

    def logits(self, row_start: torch.Tensor, edits: dict[int, Edit]) -> torch.Tensor:
        """[B, vocab] answer-position logits.  row_start [B], ascending: the first layer each row edits.
        An edit at layer j receives h [n_j, 1, d_mlp] holding the rows that have started by block j,
        which are the first n_j rows (rows keep their order)."""
        if self.staggered:
            return self._staggered_logits(row_start, edits)
        B = len(row_start)
        with edit_neurons(self.lm, edits, self.site):
            out = self.lm.model(input_ids=self.last.expand(B, 1), cache=self._cache(B))
        return out.logits[:, -1]

    # -- the clean run -------------------------------------------------------------------------------
    def _capture(self):
        """The clean run of the answer position: per block, the residual input [1, 1, d_model] and the
        (args, kwargs) it was called with; the logits [1, vocab]; the neurons at `site` [L, d_mlp] float32
        (attribution's clean activations, so that it needs no separate full-prompt pass)."""
        inputs, calls, handles = [], [], []
        cache = self._cache(1)

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs.append(hidden.detach())
            calls.append((args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        for block in self.lm.blocks:
            handles.append(block.register_forward_pre_hook(capture, with_kwargs=True))
        try:
            with record_neurons(self.lm, site=self.site) as rec:
                logits = self.lm.model(input_ids=self.last, cache=cache).logits[:, -1]  # [1, vocab]
        finally:
            for h in handles:
                h.remove()
        self._capture_cache = cache
        acts = torch.stack([rec[l][0, -1] for l in range(self.lm.n_layers)]).float()  # [L, d_mlp]
        return inputs, calls, logits, acts

    def _head_reproduces_logits(self) -> bool:
        # float32 replays agree to ~1e-6; half precision rounds every block differently from the model's own
        # attention kernel, so it is compared at its own resolution (bf16: 8 bits of mantissa)
        dtype = self.clean_logits.dtype
        tol = 1e-4 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
        scale = float(self.clean_logits.float().abs().max().clamp(min=1))
        try:
            with torch.no_grad(), self.lm.lock:
                one_row = torch.zeros(1, dtype=torch.long, device="cpu")  # one row through every block
                logits = self._staggered_logits(one_row, {})
            ok = torch.allclose(logits.float(), self.clean_logits.float(), atol=tol * scale, rtol=tol)
        except Exception as err:  # an architecture variant whose blocks cannot be replayed
            log.info(
                "staggered forward unavailable for %s (%s): running every row through the whole model",
                self.lm.name,
                err,
            )
            return False
        if not ok:
            log.info(
                "staggered forward does not reproduce %s's logits: running every row through the whole model",
                self.lm.name,
            )
        return ok

    # -- the staggered run ---------------------------------------------------------------------------
    def _staggered_logits(self, row_start: torch.Tensor, edits: dict[int, Edit]) -> torch.Tensor:
        L = self.lm.n_layers
        starts = row_start.tolist()
        assert starts == sorted(starts), "rows must be sorted by start layer"
        active = [sum(1 for s in starts if s <= j) for j in range(L)]  # rows running at block j
        B = len(starts)
        cache = _SharedPrefixCache(self.prefix)
        hidden = self.block_inputs[0][:0]  # [0, 1, d_model]
        with edit_neurons(self.lm, edits, self.site), _shared_prefix_attention(self.lm, cache):
            for j, block in enumerate(self.lm.blocks):
                if active[j] == 0:
                    continue
                new = active[j] - hidden.shape[0]
                hidden = torch.cat([hidden, self.block_inputs[j].expand(new, -1, -1)])  # [n_j, 1, d_model]
                args, kwargs = self._call_for(j, cache)
                out = block(hidden, *args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[0] < B:  # rows that start after the last block
            hidden = torch.cat([hidden, self._final_hidden().expand(B - hidden.shape[0], -1, -1)])
        return self._head(hidden)[:, -1]

    def _call_for(self, j: int, cache):
        args, kwargs = self.block_calls[j]
        swap = lambda v: cache if v is self._capture_cache else v  # noqa: E731
        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def _final_hidden(self) -> torch.Tensor:
        if not hasattr(self, "_final"):
            captured = {}
            handle = self.lm.blocks[-1].register_forward_hook(
                lambda m, a, out: captured.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach())
            )
            try:
                with torch.no_grad():
                    self.lm.model(input_ids=self.last, cache=self._cache(1))
            finally:
                handle.remove()
            self._final = captured["h"]
        return self._final

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The family's final modules, the unembedding and any logit soft-capping: [B, 1, d] -> [B, 1, vocab]."""
        for path in self.lm.family.head:
            module = _optional_submodule(self.lm.model, path)
            if module is not None:
                hidden = module(hidden)
        logits = self.lm.model.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _cache(self, batch: int):
        """A copy of the prefix cache with its keys/values repeated `batch` times (views, no copy)."""
        if self.prefix is None:
            return empty_cache(self.lm)
        cache = copy.copy(self.prefix)
        cache.layers = [copy.copy(layer) for layer in self.prefix.layers]
        for layer in cache.layers:
            layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            layer.values = layer.values.expand(batch, *layer.values.shape[1:])
        return cache


# -- how many rows one pass may hold ------------------------------------------------------------------
# Activations that autograd keeps per row, in units of the widths they scale with (measured on the LLaMA
# family: MLP hidden vectors, residual-stream vectors, attention probabilities per head and key).
_KEPT_PER_MLP_UNIT, _KEPT_PER_RESIDUAL_UNIT, _KEPT_PER_ATTENTION_KEY = 8, 16, 6


def row_bytes(lm: LoadedModel, tokens_per_row: int, context: int) -> int:
    """Bytes one row keeps for the backward pass when it runs through every layer: `tokens_per_row` new
    tokens (1 in the staggered pass, the whole prompt without it) attending over `context` keys each,
    plus the logits, their float32 softmax and its gradient for every token that reaches the head."""
    c = lm.config
    elem = next(lm.model.parameters()).element_size()
    d_model = int(getattr(c, "hidden_size", 0) or lm.d_mlp // 4)
    heads = int(getattr(c, "num_attention_heads", 0) or 1)
    per_layer = (
        tokens_per_row * (_KEPT_PER_MLP_UNIT * lm.d_mlp + _KEPT_PER_RESIDUAL_UNIT * d_model) * elem
        + heads * tokens_per_row * (context + 1) * _KEPT_PER_ATTENTION_KEY * 4
    )
    head = tokens_per_row * int(c.vocab_size) * (elem + 8)
    return lm.n_layers * per_layer + head


def rows_per_pass(
    lm: LoadedModel, tokens_per_row: int, context: int, max_rows: int | None = None, memory_budget: int | None = None
) -> int:
    """How many rows one batched pass runs: at most `max_rows` tokens, and no more rows than fit
    `memory_budget` bytes (defaults: the LoadedModel's `max_rows` and `memory_budget`); at least one."""
    max_rows = lm.max_rows if max_rows is None else max_rows
    memory_budget = lm.memory_budget if memory_budget is None else memory_budget
    if max_rows < 1 or memory_budget < 1:
        raise ValueError(f"max_rows and memory_budget must be positive, got {max_rows} and {memory_budget}")
    by_tokens = max_rows // tokens_per_row
    by_memory = memory_budget // row_bytes(lm, tokens_per_row, context)
    return max(1, min(by_tokens, by_memory))


def answer_runner(lm: LoadedModel, step, site: str = "post", keep: bool = True) -> AnswerPositionRunner | None:
    """The one factory of runners: the AnswerPositionRunner of `step` (a dkn.query.Step) when its answer
    position is the last token of a causal prompt, else None.  With `keep`, runners are kept on the
    LoadedModel (the last RUNNER_CACHE_SIZE prompts), so that live interventions cost one single-token
    pass; attribution builds a fresh one (keep=False) and lets it go with its rows."""
    if lm.family.masked_lm or step.position != len(step.input_ids) - 1:
        return None
    ids = torch.tensor([step.input_ids], device=lm.device)  # [1, T]
    if not keep or _NO_KEPT_RUNNERS.get():
        return AnswerPositionRunner(lm, ids, site)
    key = (tuple(step.input_ids), site)
    with lm.lock:
        runner = lm.runners.pop(key, None) or AnswerPositionRunner(lm, ids, site)
        lm.runners[key] = runner
        while len(lm.runners) > RUNNER_CACHE_SIZE:
            lm.runners.popitem(last=False)
    return runner


def empty_cache(lm: LoadedModel):
    """A key/value cache for `lm` whose own bookkeeping tensors (sliding-window layers make one when
    built) live on the model's device."""
    from transformers import DynamicCache

    with torch.device(lm.device):
        return DynamicCache(config=lm.config)


def _optional_submodule(root, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


# -- attention over a shared prefix ----------------------------------------------------------------------
ATTENTION_NAME = "dkn_shared_prefix"
_PREFIX: contextvars.ContextVar = contextvars.ContextVar("dkn_shared_prefix")


class _SharedPrefixCache:
    """Stands in for the key/value cache in the staggered pass: hands attention only the new token's
    keys/values; the prefix's stay in `layers` ([1, kv_heads, prefix, head_dim] each) for
    `shared_prefix_attention`, which every row reads without a copy."""

    def __init__(self, prefix):
        self.layers = [(layer.keys, layer.values) for layer in prefix.layers] if prefix is not None else None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


def shared_prefix_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """Attention of one new token per row over the shared prefix and itself.
    query [B, H, 1, hd]; key, value [B, kv_heads, 1, hd] (the new token's); the prefix comes from the
    running _SharedPrefixCache.  Returns ([B, 1, H, hd], None) like transformers' attention functions.

    The prefix's keys/values [1, kv_heads, P, hd] are never broadcast to the B rows (a broadcast matmul
    would materialise them per row, and autograd would keep the copies for every layer): the rows are
    folded into the matrix dimension instead, one [B * groups, hd] @ [hd, P] product per key/value head."""
    cache = _PREFIX.get(None)
    if cache is None:  # a pass in a thread that set no prefix
        return _fallback_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kwargs
        )
    B, H, _, hd = query.shape
    kv = key.shape[1]
    groups = H // kv
    scaling = scaling if scaling is not None else hd**-0.5
    k_new, v_new = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # [B, H, 1, hd]
    scores_self = (query * k_new).sum(-1, keepdim=True) * scaling  # [B, H, 1, 1]
    if cache.layers is None:
        scores, v_pre = scores_self, None
    else:
        k_pre, v_pre = cache.layers[module.layer_idx]  # [1, kv, P, hd]
        # head h reads key/value head h // groups (repeat_interleave order)
        q_rows = query.reshape(B, kv, groups, hd).permute(1, 0, 2, 3).reshape(kv, B * groups, hd)
        scores_pre = torch.matmul(q_rows, k_pre[0].transpose(1, 2)) * scaling  # [kv, B * groups, P]
        scores_pre = scores_pre.reshape(kv, B, groups, -1).permute(1, 0, 2, 3).reshape(B, H, 1, -1)  # [B, H, 1, P]
        scores = torch.cat([scores_pre, scores_self], -1)  # [B, H, 1, P+1]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., -scores.shape[-1] :]
    weights = scores.float().softmax(-1).to(query.dtype)
    out = weights[..., -1:] * v_new  # [B, H, 1, hd]
    if v_pre is not None:
        w_rows = weights[..., :-1].reshape(B, kv, groups, -1).permute(1, 0, 2, 3).reshape(kv, B * groups, -1)
        out_pre = torch.matmul(w_rows, v_pre[0])  # [kv, B * groups, hd]
        out = out + out_pre.reshape(kv, B, groups, hd).permute(1, 0, 2, 3).reshape(B, H, 1, hd)
    return out.transpose(1, 2).contiguous(), None


# config id -> [how many passes use the switch now, the implementation to restore]; under _SWITCH_LOCK
_SWITCHED: dict[int, list] = {}
_SWITCH_LOCK = threading.Lock()


@contextmanager
def _shared_prefix_attention(lm: LoadedModel, cache: _SharedPrefixCache):
    """Switch every attention module of `lm` to shared_prefix_attention for the duration.

    The switch lives on the model's shared config, the prefix in this thread's context: a pass in another
    thread that sets no prefix runs the original attention (`_fallback_attention`), and overlapping switches
    are counted so that the last one out restores the original implementation (never "dkn_shared_prefix")."""
    configs = {id(m.config): m.config for m in lm.model.modules() if hasattr(m, "config")}
    token = _PREFIX.set(cache)
    with _SWITCH_LOCK:
        for k, c in configs.items():
            entry = _SWITCHED.setdefault(k, [0, c._attn_implementation])
            entry[0] += 1
            c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            for k, c in configs.items():
                entry = _SWITCHED[k]
                entry[0] -= 1
                if entry[0] == 0:
                    c._attn_implementation = entry[1]
                    del _SWITCHED[k]
        _PREFIX.reset(token)


def _fallback_attention(module, *args, **kwargs):
    """The attention the model had before the switch, for a pass that set no shared prefix (another
    thread's plain forward while a staggered pass runs): the registered function of that name, or for
    "eager" (and unset) the model's own `eager_attention_forward` (softcapping included, e.g. Gemma 2), else
    SDPA.  While the switch is on, transformers builds no attention mask (the name has no mask function),
    so such a pass is right for unpadded inputs without a sliding window (causal attention) but loses a
    padding or sliding-window mask: dkn's own passes never get here (they hold the model's lock); code that
    pads a batch in another thread must take `lm.lock` too."""
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(id(getattr(module, "config", None)))
    original = entry[1] if entry is not None else None
    if original not in (None, "eager", ATTENTION_NAME) and original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original](module, *args, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)
    query, key, value, attention_mask, *rest = args
    if attention_mask is None and query.shape[-2] > 1:  # eager reads causality from the mask: build it
        q, k = query.shape[-2], key.shape[-2]
        blocked = torch.ones(q, k, dtype=torch.bool, device=query.device).triu(k - q + 1)  # [q, k]
        attention_mask = torch.zeros(q, k, dtype=query.dtype, device=query.device).masked_fill(
            blocked, torch.finfo(query.dtype).min
        )[None, None]  # [1, 1, q, k], additive
    kwargs.pop("is_causal", None)
    return eager(module, query, key, value, attention_mask, *rest, **kwargs)


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
