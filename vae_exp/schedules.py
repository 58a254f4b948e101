"""Learning-rate schedules that torch.optim does not have (stepped once per epoch, as the
trainer steps every scheduler)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from vae_exp.config import invalid, is_count, is_integer, is_number


class StagedLR(LRScheduler):
    """Burda et al. 2015's schedule: the learning rate is constant within stages and falls
    tenfold every `stages_per_decade` stages. Stage i (from 0) lasts `stage_epochs[i]` epochs
    at lr * 10^(-i / stages_per_decade), lr being the optimizer's rate; after the last stage
    the rate stays where it is. Burda et al.: stage_epochs = [3^0, 3^1, ..., 3^7] (3,280 in
    all), stages_per_decade = 7, lr = 0.001.

    `epochs` is the sum of `stage_epochs`, stated (and checked) so that a config can set
    `trainer.epochs: ${optim.scheduler.epochs}`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        stage_epochs: Sequence[int],
        epochs: int,
        stages_per_decade: float = 7.0,
        last_epoch: int = -1,
    ) -> None:
        counts = "a non-empty list of integers >= 1 (epochs per stage)"
        if isinstance(stage_epochs, str) or not isinstance(stage_epochs, Sequence):
            raise invalid("optim.scheduler.stage_epochs", stage_epochs, counts)
        stages = list(stage_epochs)
        if not stages or not all(is_count(n) for n in stages):
            raise invalid("optim.scheduler.stage_epochs", stages, counts)
        if not (is_integer(epochs) and epochs == sum(stages)):
            raise invalid(
                "optim.scheduler.epochs", epochs, f"the sum of stage_epochs, {sum(stages)}"
            )
        if not (is_number(stages_per_decade) and stages_per_decade > 0):
            raise invalid("optim.scheduler.stages_per_decade", stages_per_decade, "a number > 0")
        self.stage_epochs = stages
        self.ends = list(itertools.accumulate(stages))  # the epoch each stage ends with
        self.stages_per_decade = float(stages_per_decade)
        super().__init__(optimizer, last_epoch)

    def stage(self, epochs_done: int) -> int:
        """The stage (0-based) of the epoch after `epochs_done` finished epochs."""
        return min(bisect.bisect_right(self.ends, epochs_done), len(self.ends) - 1)

    def get_lr(self) -> list[float]:
        factor = 10.0 ** (-self.stage(self.last_epoch) / self.stages_per_decade)
        return [base * factor for base in self.base_lrs]
