"""dkn.query: prompts and answers into per-token steps."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from dkn.query import QueryError, make_query, normalise_answer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def causal():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def masked():
    return tiny_model("bert")


def _ids(lm, text):
    return lm.tokenizer(text)["input_ids"]


def test_leading_space_added():
    assert normalise_answer(PROMPT, "paris") == " paris"
    assert normalise_answer(PROMPT, " paris") == " paris"
    assert normalise_answer(PROMPT + " ", "paris") == "paris"
    assert normalise_answer(PROMPT, "\tparis") == "\tparis"


def test_query_answer_and_single_step(causal):
    q = make_query(causal, PROMPT, "paris")
    assert q.prompt == PROMPT and q.answer == " paris"
    assert q.n_answer_tokens == 1 and q.answer_tokens == ("paris",)
    (step,) = q.steps
    prompt_ids = _ids(causal, PROMPT)
    assert step.input_ids == tuple(prompt_ids)
    assert step.position == len(prompt_ids) - 1
    assert step.target == causal.tokenizer.convert_tokens_to_ids("paris")
    assert make_query(causal, PROMPT, " paris").steps == q.steps


@pytest.mark.parametrize(
    "prompt, answer, what",
    [
        ("", "paris", "prompt is empty"),
        ("   ", "paris", "prompt is empty"),
        (PROMPT, "", "answer is empty"),
        (PROMPT, " \n", "answer is empty"),
    ],
)
def test_empty_prompt_or_answer(causal, masked, prompt, answer, what):
    for lm in (causal, masked):
        with pytest.raises(QueryError, match=what) as err:
            make_query(lm, prompt, answer)
        assert isinstance(err.value, ValueError)
        assert "e.g." in str(err.value) or "type" in str(err.value)  # says what to do


def test_overlong_prompt(causal, masked):
    assert causal.max_length == masked.max_length == 64
    long_prompt = " ".join(["the sky"] * 40)  # 80 tokens
    for lm in (causal, masked):
        with pytest.raises(QueryError, match=r"at most 64.*shorten the prompt"):
            make_query(lm, long_prompt, "blue")
    # the limit counts the longest step, prompt plus gold prefix: 63 prompt tokens + a 2-token answer
    edge = " ".join(["sky"] * 63)
    make_query(causal, edge, "blue")  # 63 tokens: fits
    with pytest.raises(QueryError, match="64"):
        make_query(causal, edge + " sky", "new york")  # the second step reads 65 tokens


def test_too_many_answer_tokens(causal):
    with pytest.raises(QueryError, match="at most 3 tokens"):
        make_query(causal, PROMPT, "new york city country", max_answer_tokens=3)


def test_multi_token_steps_conditioned_on_gold_prefix(causal):
    q = make_query(causal, PROMPT, "new york city")
    prompt_ids = _ids(causal, PROMPT)
    gold = [causal.tokenizer.convert_tokens_to_ids(w) for w in ("new", "york", "city")]
    assert q.answer == " new york city" and q.answer_tokens == ("new", "york", "city")
    assert [s.target for s in q.steps] == gold
    for i, step in enumerate(q.steps):
        assert step.input_ids == tuple(prompt_ids + gold[:i])  # the gold prefix, not a model guess
        assert step.position == len(step.input_ids) - 1


def test_masked_steps_fill_earlier_masks_with_gold_tokens(masked):
    tok = masked.tokenizer
    q = make_query(masked, PROMPT, "new york city")
    gold = [tok.convert_tokens_to_ids(w) for w in ("new", "york", "city")]
    assert [s.target for s in q.steps] == gold
    template = tok.convert_tokens_to_ids(["[CLS]", *PROMPT.split(), "[MASK]", "[MASK]", "[MASK]", ".", "[SEP]"])
    first_mask = template.index(tok.mask_token_id)
    for i, step in enumerate(q.steps):
        expected = list(template)
        expected[first_mask : first_mask + i] = gold[:i]
        assert list(step.input_ids) == expected, i
        assert step.position == first_mask + i
        assert step.input_ids[step.position] == tok.mask_token_id
        assert list(step.input_ids).count(tok.mask_token_id) == 3 - i


def test_long_prompt_refused_with_its_length(causal):
    from dkn.query import MAX_PROMPT_TOKENS, check_prompt_length

    long_prompt = " ".join(["the capital of france is"] * 200)
    n = len(_ids(causal, long_prompt))
    assert n > MAX_PROMPT_TOKENS
    with pytest.raises(QueryError, match=rf"{n:,} tokens long.*at most {MAX_PROMPT_TOKENS:,}"):
        make_query(causal, long_prompt, "paris")
    # configurable per call: a higher limit lets it through to the next check (this tiny model reads 64 tokens)
    with pytest.raises(QueryError, match="this model reads at most"):
        make_query(causal, long_prompt, "paris", max_prompt_tokens=n)
    with pytest.raises(QueryError, match="at most 3 tokens"):
        make_query(causal, PROMPT, "paris", max_prompt_tokens=3)
    assert check_prompt_length(causal, PROMPT) == len(_ids(causal, PROMPT))
    with pytest.raises(ValueError, match="at least 1"):
        check_prompt_length(causal, PROMPT, 0)
