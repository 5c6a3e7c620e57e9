"""Which parameters decode the test sets: the best checkpoint, or the average of the last k checkpoints if that
scores higher on the dev set.

    choice = choose_final_model(validator, data, checkpointer, cfg.train, cfg.optim.label_smoothing, best_bleu, update)
    choice.name        # "best", "average-last-5" or "final" (no best checkpoint exists)
    choice.dev_bleu    # {"best": 31.2, "average-last-5": 32.0}: every candidate's dev BLEU

Every call is a collective: rank 0 decides which files exist and reads them, every rank follows via broadcast, so
other hosts need not share rank 0's disk. Candidates are scored with the same bounded dev sample as validation
(`Validator.dev`); the best checkpoint's score is the one recorded when it was saved (the same sample and model, so
decoding it again would only cost time). Ties keep the earlier candidate (best before average).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dist_nmt import distributed
from dist_nmt.checkpoint import Checkpointer, average_params, verify
from dist_nmt.config import TrainConfig
from dist_nmt.data import RunData
from dist_nmt.errors import CheckpointError
from dist_nmt.validate import Validator

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """The model loaded for the test decode and every candidate's dev BLEU (None: not scored)."""

    name: str
    dev_bleu: dict[str, float | None] = field(default_factory=dict)

    def describe(self) -> str:
        """`average-last-5 model; dev BLEU best 31.20, average-last-5 32.00` (for the TEST lines)."""
        scored = ", ".join(f"{n} {b:.2f}" for n, b in self.dev_bleu.items() if b is not None)
        return f"{self.name} model" + (f"; dev BLEU {scored}" if len(self.dev_bleu) > 1 and scored else "")


def average_last(checkpointer: Checkpointer, k: int, out_file: Path) -> tuple[str, Path] | None:
    """Average the newest `k` checkpoints that verify into `out_file` (primary only); None when fewer than two."""
    good = []
    for path in reversed(checkpointer.list()):
        if len(good) == k:
            break
        try:
            verify(path)
            good.append(path)
        except CheckpointError as err:
            log.warning("not averaging corrupt checkpoint: %s", err)
    if len(good) < 2:
        return None
    average_params(sorted(good), out_file)
    log.info("averaged %d checkpoints (%s) into %s", len(good), ", ".join(p.name for p in sorted(good)), out_file)
    return f"average-last-{len(good)}", out_file


def _candidates(checkpointer: Checkpointer, k: int, update: int) -> list[tuple[str, str]]:
    """(name, params file) of every candidate, on rank 0: best (or the final checkpoint), then the average."""
    best = checkpointer.best_params()
    first = ("best", str(best)) if best else ("final", str(checkpointer.path(update) / "model.params"))
    average = average_last(checkpointer, k, checkpointer.directory / "average.params") if k else None
    return [first] + ([(average[0], str(average[1]))] if average else [])


def load_candidate(validator: Validator, params_file: str, name: str) -> None:
    """Rank 0 loads `params_file` into the validator's model and broadcasts it to every rank."""
    if validator.world.is_primary:
        validator.model.load_parameters(params_file, ctx=validator.ctx)
    distributed.broadcast_parameters(validator.model.collect_params(), name=f"final.{name}")


def choose_final_model(validator: Validator, data: RunData, checkpointer: Checkpointer, train_cfg: TrainConfig,
                       label_smoothing: float, best_bleu: float, update: int) -> Choice:
    """Score the candidates on dev, load the winner into `validator.model` on every rank, return the choice."""
    plan = _candidates(checkpointer, train_cfg.average_last, update) if validator.world.is_primary else None
    plan = distributed.broadcast_object(plan, name="final.candidates")
    scores: dict[str, float | None] = {name: (best_bleu if name == "best" else None) for name, _ in plan}
    loaded = ""
    if len(plan) > 1:
        for name, params_file in plan:
            if scores[name] is None:
                load_candidate(validator, params_file, name)
                loaded = name
                values = validator.dev(data, label_smoothing, train_cfg.eval_sample_sentences, update)
                scores[name] = values["bleu"]
                log.info("candidate %s: dev BLEU %.2f on %d dev sentences", name, values["bleu"],
                         values["sentences"])
    winner = max(plan, key=lambda c: -1e9 if scores[c[0]] is None else scores[c[0]])  # first of equal maxima
    if winner[0] != loaded:
        load_candidate(validator, winner[1], winner[0])
    choice = Choice(winner[0], scores)
    log.info("final model: %s", choice.describe())
    return choice
