"""One rendering of the chat template for every caller, and the three ways it fails, each blamed on its culprit."""

import copy

import pytest

from data_fixtures import gpt2_tokenizer, tokenizer  # noqa: F401
from sdpo_jax.choice_eval.encode import prompt_texts
from sdpo_jax.choice_eval.questions import ChoiceQuestion
from sdpo_jax.data import DataError
from sdpo_jax.data.chat_template import ChatTemplateRefused, render_chat, user_turn
from sdpo_jax.reward_scorer import render_texts
from sdpo_jax.run_context import prompt_ids
from sdpo_jax.scorers import ScorerError

REFUSES_LONG = (
    "{% for m in messages %}{% if m['content'] | length > 10 %}{{ raise_exception('too long') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def refusing(tokenizer):  # noqa: F811
    """The Llama tokenizer with a template that refuses any message over 10 characters."""
    refusing = copy.deepcopy(tokenizer)
    refusing.chat_template = REFUSES_LONG
    return refusing


def test_every_caller_renders_the_same_user_turn(tokenizer):  # noqa: F811
    text = render_chat(tokenizer, user_turn("hi there"), generation_prompt=True, needed_by="test")
    assert text == tokenizer.apply_chat_template(user_turn("hi there"), tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tokenizer, "hi there") == tokenizer(text, add_special_tokens=False)["input_ids"]
    question = ChoiceQuestion("hi there", ("a", "b"), 0, "q.jsonl:1")
    assert prompt_texts(tokenizer, question, chat_template=True) == (text, ["a", "b"])


def test_no_template_and_a_broken_template_blame_the_tokenizer(gpt2_tokenizer, tokenizer):  # noqa: F811
    with pytest.raises(DataError, match="the chat-template prompt needs a chat template"):
        prompt_texts(gpt2_tokenizer, ChoiceQuestion("q", ("a", "b"), 0, "q.jsonl:1"), chat_template=True)
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(DataError, match="does not parse"):
        render_chat(broken, user_turn("hi"), generation_prompt=True, needed_by="test")


def test_a_refused_conversation_is_blamed_on_the_input(refusing):
    assert render_chat(refusing, user_turn("short"), generation_prompt=True, needed_by="test").endswith("<assistant>")
    with pytest.raises(ChatTemplateRefused, match="too long"):
        prompt_ids(refusing, "a prompt over ten characters")
    with pytest.raises(DataError, match=r"q.jsonl:7: .*refuses this question: too long"):
        prompt_texts(refusing, ChoiceQuestion("a long question", ("a", "b"), 0, "q.jsonl:7"), chat_template=True)
    with pytest.raises(ScorerError, match="refuses a \\(prompt, completion\\) pair: too long"):
        render_texts(refusing, ["short"], ["a long completion"])


def test_a_refused_generation_prompt_names_its_setting(refusing):
    from types import SimpleNamespace

    from sdpo_jax.errors import ConfigError
    from sdpo_jax.run_context import RunContext

    run = SimpleNamespace(tokenizer=refusing, model=SimpleNamespace(config=SimpleNamespace(vocab_size=32000)))
    assert len(RunContext.user_prompt_ids(run, ["ok"], "eval.prompts")) == 1
    with pytest.raises(ConfigError, match=r"eval.prompts\[1\]: the tokenizer's chat template refuses this prompt"):
        RunContext.user_prompt_ids(run, ["ok", "a prompt over ten characters"], "eval.prompts")
