"""What the run records about one stage: `StageReport`, one entry of stage_report.json.

    stage, num_pairs, sources, steps        the stage's training pairs (its chunk, any replayed pairs, or its
                                            generated pairs), its chunk's sources and its optimizer steps
    replayed                                how many of num_pairs are replayed from earlier chunks
                                            (sdpo.replay_fraction; 0: none)
    ref_logratio_mean                       gamma_t: mean over the stage's pairs (replayed ones too) of
                                            log pi_ref(y_w|x) - log pi_ref(y_l|x)
                                            under the stage's reference as the stage starts
    reference                               {"model": "M0" | "M<t-1>", "moved": bool, "sync_steps", "mixup_alpha"}
    dpo, learning_rate                      the stage's loss settings and peak learning rate
    eval_before / eval_after                held-out preference metrics of M(t-1) / M(t), both against M0
    generations_before / _after             answers to eval.prompts
    choices_before / _after                 multiple-choice accuracy (eval.choices)
    reward_before / _after                  mean score of greedy answers to eval.reward_prompts ({} without them)
    generated                               for an on-policy stage: prompts, pairs, mean best / worst score, ...
"Before" is always the stage's starting model M(t-1), "after" the stage's result M(t).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class StageReport:
    stage: int
    num_pairs: int
    sources: list[str]
    steps: int
    ref_logratio_mean: float
    reference: dict[str, Any]
    dpo: dict[str, Any]
    learning_rate: float
    replayed: int = 0
    eval_before: dict = dataclasses.field(default_factory=dict)
    eval_after: dict = dataclasses.field(default_factory=dict)
    generations_before: list = dataclasses.field(default_factory=list)
    generations_after: list = dataclasses.field(default_factory=list)
    choices_before: dict = dataclasses.field(default_factory=dict)
    choices_after: dict = dataclasses.field(default_factory=dict)
    reward_before: dict = dataclasses.field(default_factory=dict)
    reward_after: dict = dataclasses.field(default_factory=dict)
    generated: dict | None = None

    def to_json(self) -> dict:
        """The JSON object of stage_report.json (an offline stage has no 'generated' key)."""
        entry = dataclasses.asdict(self)
        if entry["generated"] is None:
            del entry["generated"]
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> StageReport:
        """An entry read back (a run resumed after finished stages); fields it predates take their defaults."""
        names = {field.name for field in dataclasses.fields(cls)}
        defaults = {"reference": {}, "dpo": {}, "learning_rate": 0.0}
        return cls(**{**defaults, **{k: v for k, v in entry.items() if k in names}})

    def before_checks(self) -> dict:
        """What this stage measured after training (its M(t)): the next stage's 'before'."""
        return {"generations": self.generations_after, "choices": self.choices_after, "reward": self.reward_after}
