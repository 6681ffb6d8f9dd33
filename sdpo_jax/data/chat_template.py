"""A tokenizer's chat template, rendered in one place for every part that needs it.

    text = render_chat(tokenizer, messages, generation_prompt=True, needed_by="eval.prompts")

used by the data loader (pairs' conversations), the generation prompts (``eval.prompts``,
``eval.reward_prompts``, on-policy stages), the multiple-choice check and the reward-model scorer.
Three ways it can fail, each told apart because each has another culprit:

- the tokenizer has no template: `DataError` naming what needed one (a setting or the data's format);
- the template does not parse (jinja2 TemplateSyntaxError): `DataError` on the tokenizer;
- the template refuses this conversation (it raises, e.g. "roles must alternate"): `ChatTemplateRefused`,
  which the data loader reports against the record and other callers against their setting.
"""

from __future__ import annotations

from typing import Any

from sdpo_jax.data.errors import DataError


class ChatTemplateRefused(ValueError):
    """The chat template raised an error for this conversation (its own check, not a syntax error)."""


def user_turn(text: str) -> list[dict]:
    """One user message: the conversation of a plain prompt."""
    return [{"role": "user", "content": text}]


def render_chat(tokenizer: Any, messages: list[dict], *, generation_prompt: bool, needed_by: str) -> str:
    """The text of ``messages`` (role/content dicts) as ``tokenizer``'s chat template renders it, ending with
    the assistant's generation prompt when ``generation_prompt``; ``needed_by`` names, in the error of a
    tokenizer without a template, what asked for one."""
    import jinja2  # transformers renders chat templates with it; a missing package stops the run

    if not tokenizer.chat_template:
        raise DataError(
            "tokenizer",
            f"{needed_by} needs a chat template, and this tokenizer has none (set chat_template in "
            "tokenizer_config.json)",
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateSyntaxError as err:  # the tokenizer's fault, whatever the conversation
        raise DataError("tokenizer", f"its chat template does not parse: {err}") from None
    except jinja2.TemplateError as err:
        raise ChatTemplateRefused(str(err)) from None
