"""Turning normalized pairs into token ids: prompt_ids, chosen_ids, rejected_ids.

The prompt/completion boundary. The prompt is tokenized on its own, exactly as it will be fed
to the model at generation time: text prompts with the tokenizer's special tokens (BOS), chat
prompts as the chat template renders them with the generation prompt (and without adding
special tokens again, since templates write their own BOS). Each completion is tokenized on its
own too, as the continuation of a special token (the EOS string is put in front and its id cut
off again), and appended. So:

- no token ever straddles the boundary: the completion ids decode to exactly the response
  text, and the loss covers exactly the response;
- SentencePiece's dummy prefix is not added to completions: a response "\\n\\nfoo" does not get
  a stray "▁" token it never had in context (tokenizing it plainly would add one);
- where a tokenizer would merge across the boundary in running text (say a prompt that ends in
  a space, before "Sure" in GPT-2: ":", " Sure" in context, but ":", " ", "Sure" split), the
  split form is kept, because the model at generation time does see the prompt's final token.
  Such completions are counted (`boundary_merges`) and reported, since they usually point at a
  prompt with trailing whitespace.

Completions end with EOS: text completions get the EOS id appended; chat completions are the
template's rendering of the assistant turn (which normally closes with the template's own
end-of-turn/EOS token), and get EOS appended only when that rendering holds no EOS id.
A text prompt that already begins with the BOS token text (say it was rendered by a chat
template beforehand) is not given a second BOS, so it tokenizes like the chat path.

Pre-tokenized pairs are used as they are (no special tokens added, no EOS appended).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sdpo_jax.data.chat_template import render_chat
from sdpo_jax.data.errors import DataError
from sdpo_jax.data.validation import token_range_problem

SIDES = ("prompt", "chosen", "rejected")


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids or templates."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, len(tokenizer)], default=str
        ).encode()
    )
    return h.hexdigest()[:32]


class PairEncoder:
    """Tokenizes batches of normalized pairs of one kind (see the module docstring)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer", "has no EOS token, which completions must end with")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token
        anchor = tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        if anchor != [self.eos_id]:
            raise DataError(
                "tokenizer",
                f"the EOS text {tokenizer.eos_token!r} does not tokenize to the EOS id alone (got {anchor})",
            )

    def encode(self, kind: str, batch: dict[str, list]) -> dict[str, list]:
        """Returns {prompt_ids, chosen_ids, rejected_ids, boundary_merges, error, error_field}."""
        n = len(batch["prompt"])
        out: dict[str, list] = {"boundary_merges": [0] * n, "error": [""] * n, "error_field": [""] * n}
        if kind == "tokens":
            out.update({f"{side}_ids": batch[side] for side in SIDES})
            return out
        if kind == "chat":
            texts = self._render(batch, out)
            add_special = False
        else:
            texts = {side: batch[side] for side in SIDES}
            add_special = True
        out["prompt_ids"] = self._encode(texts["prompt"], add_special)
        for side in ("chosen", "rejected"):
            completions = self._encode_completions(texts[side])
            in_context = self._encode([p + c for p, c in zip(texts["prompt"], texts[side])], add_special)
            for i, (p, c) in enumerate(zip(out["prompt_ids"], completions)):
                out["boundary_merges"][i] += in_context[i] != p + c
                if kind == "text" or self.eos_id not in c:
                    c.append(self.eos_id)
            out[f"{side}_ids"] = completions
        for i in range(n):
            for side in SIDES:
                problem = token_range_problem(out[f"{side}_ids"][i], self.vocab_size)
                if problem and not out["error"][i]:
                    out["error"][i], out["error_field"][i] = problem, side
        return out

    def _render(self, batch: dict[str, list], out: dict[str, list]) -> dict[str, list[str]]:
        """Chat template text of each prompt (with generation prompt) and of each completion."""
        texts: dict[str, list[str]] = {side: [] for side in SIDES}
        for i, prompt in enumerate(batch["prompt"]):
            rendered = {side: "" for side in SIDES}
            try:
                rendered["prompt"] = self._template(prompt, True)
                for side in ("chosen", "rejected"):
                    full = self._template(prompt + batch[side][i], False)
                    if not full.startswith(rendered["prompt"]):
                        raise ValueError(
                            "the chat template does not render the prompt (with "
                            "generation prompt) as a prefix of the conversation"
                        )
                    rendered[side] = full[len(rendered["prompt"]) :]
            except DataError:  # no template, or one that does not parse: the tokenizer's fault, it stops the load
                raise
            except ValueError as err:  # ChatTemplateRefused or not a prefix: this conversation, not the tokenizer
                out["error"][i], out["error_field"][i] = f"chat template: {err}", "prompt"
            for side in SIDES:
                texts[side].append(rendered[side])
        return texts

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        return render_chat(
            self.tokenizer, messages, generation_prompt=generation_prompt, needed_by="conversational data"
        )

    def _encode(self, texts: Sequence[str], add_special: bool) -> list[list[int]]:
        ids = self.tokenizer(list(texts), add_special_tokens=add_special, verbose=False)["input_ids"]
        if add_special and self.bos_id is not None:
            ids = [
                x[1:] if x[:2] == [self.bos_id, self.bos_id] and t.startswith(self.bos_text) else x
                for x, t in zip(ids, texts)
            ]
        return ids

    def _encode_completions(self, texts: Sequence[str]) -> list[list[int]]:
        anchor = self.tokenizer.eos_token
        ids = self.tokenizer([anchor + t for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
        return [x[1:] for x in ids]
