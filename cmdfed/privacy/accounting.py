"""A site's privacy ledger: the DP-SGD steps it has taken in a run, kept on its own disk.

Each round may run in a new ClientApp process, so the accountant cannot live in memory.
The ledger is a JSON file in the site's work folder, ``WORK_DIR/privacy/RUN_ID.json``
(``RUN_ID`` is the server's run id, stable across server restarts), rewritten atomically
after every trained round. It holds the site's fixed noise multiplier and one entry per
trained round (noise multiplier, sampling rate, steps); the spent epsilon is recomputed
from those entries with Opacus's RDP accountant, so the file is the accountant's state.

The noise multiplier is chosen once, at the site's first private round: the one given in
the run config, or the smallest one for which the *planned* training (every round of the
phases the site can take part in, ``local-steps`` each, at the larger of their sampling
rates) spends at most the budget. It then stays fixed, so a later round never trades
privacy for a budget that was planned differently. Before each round the site asks :meth:`PrivacyLedger.check`
whether the round would take it past its budget; if so it declines to train.

A round that is recorded and then re-run (the server crashed before checkpointing it) is
counted again: its noise is drawn afresh, so the second release costs privacy too.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmdfed.atomic import write_json_atomic
from cmdfed.errors import CmdfedError

LEDGER_FORMAT = 1
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BudgetExhausted(CmdfedError):
    """The next round would spend more than the site's budget; the site declines to train."""

    def __init__(self, spent: float, would_be: float, budget: float):
        super().__init__(
            f"privacy budget spent: epsilon {spent:.3f} of {budget:g} used, the next round would reach {would_be:.3f}"
        )
        self.spent, self.would_be, self.budget = spent, would_be, budget


@dataclass(frozen=True)
class PrivateSteps:
    """One round's DP-SGD: ``steps`` batches at ``sample_rate`` with ``noise_multiplier``."""

    phase: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    path: Path
    budget_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    rounds: list[PrivateSteps] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        work_dir: Path,
        run_id: str,
        *,
        budget_epsilon: float,
        delta: float,
        max_grad_norm: float,
        noise_multiplier: Callable[[], float],
    ) -> PrivacyLedger:
        """The site's ledger of run ``run_id``; a new one fixes ``noise_multiplier()``.

        An existing ledger keeps the noise multiplier it was started with; its budget, delta
        and clipping norm must match the run's (the server refuses to resume a run with
        other settings, so a mismatch means the ledger belongs to something else).
        """
        if not RUN_ID.fullmatch(run_id):
            raise CmdfedError(f"run id {run_id!r} is not a plain identifier; the server sent a malformed instruction")
        path = work_dir / "privacy" / f"{run_id}.json"
        if not path.is_file():
            return cls(path, budget_epsilon, delta, max_grad_norm, noise_multiplier())
        try:
            saved = json.loads(path.read_text())
            ledger = cls(
                path,
                float(saved["budget_epsilon"]),
                float(saved["delta"]),
                float(saved["max_grad_norm"]),
                float(saved["noise_multiplier"]),
                [PrivateSteps(**r) for r in saved["rounds"]],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CmdfedError(
                f"the privacy ledger {path} is unreadable ({exc}); this site cannot tell what it has spent, so it "
                "does not train in this run: restore the file from a backup or leave the run"
            ) from exc
        if (ledger.budget_epsilon, ledger.delta, ledger.max_grad_norm) != (budget_epsilon, delta, max_grad_norm):
            raise CmdfedError(
                f"the privacy ledger {path} was started with epsilon {ledger.budget_epsilon:g}, delta "
                f"{ledger.delta:g}, max-grad-norm {ledger.max_grad_norm:g}, but the run now asks for "
                f"{budget_epsilon:g}, {delta:g}, {max_grad_norm:g}; a run's privacy settings cannot change"
            )
        return ledger

    @property
    def epsilon(self) -> float:
        return epsilon_spent(self.rounds, self.delta)

    def check(self, round: PrivateSteps) -> float:
        """The epsilon after ``round``; :class:`BudgetExhausted` if that exceeds the budget."""
        after = epsilon_spent([*self.rounds, round], self.delta)
        if after > self.budget_epsilon:
            raise BudgetExhausted(self.epsilon, after, self.budget_epsilon)
        return after

    def record(self, round: PrivateSteps) -> float:
        """Add a trained round and write the ledger atomically; returns the epsilon spent now."""
        self.rounds.append(round)
        write_json_atomic(
            self.path,
            {
                "format": LEDGER_FORMAT,
                "budget_epsilon": self.budget_epsilon,
                "delta": self.delta,
                "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier,
                "rounds": [asdict(r) for r in self.rounds],
                "epsilon": self.epsilon,
                "updated_at": time.time(),
            },
        )
        return self.epsilon


def epsilon_spent(rounds: list[PrivateSteps], delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` of DP-SGD, by Opacus's RDP accountant."""
    if not rounds:
        return 0.0
    from opacus.accountants import RDPAccountant  # here: a site's rounds without DP never load Opacus (~1 s)

    accountant = RDPAccountant()
    accountant.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds]
    return float(accountant.get_epsilon(delta))


def noise_for_budget(budget_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier with which ``steps`` steps at ``sample_rate`` spend at most the budget."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        sigma = get_noise_multiplier(
            target_epsilon=budget_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    except ValueError as exc:
        raise CmdfedError(
            f"no noise level reaches epsilon {budget_epsilon:g} in {steps} steps ({exc}); raise dp-epsilon"
        ) from exc
    if not math.isfinite(sigma) or sigma <= 0:
        raise CmdfedError(f"no usable noise level for epsilon {budget_epsilon:g} in {steps} steps; raise dp-epsilon")
    return float(sigma)
