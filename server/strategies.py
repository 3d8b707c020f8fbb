"""Flower strategies from the run config, and their state as tensors for round checkpoints.

FedAvg is the default; FedProx adds the proximal term on the sites (``proximal-mu`` rides
in the train config and ``cmdfed.federation.local`` applies it); FedAdam and FedYogi keep
server-side moments (``m_t``, ``v_t``) that must survive a restart, so they are saved with
every round and put back when a phase resumes mid-way. Every strategy averages weighted by
the sites' ``num-examples``.

Central differential privacy (``dp-mode = "central"``) wraps the strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping``: the server clips each site's update
``w_site - w_global`` to ``dp-clip-norm`` and adds Gaussian noise of std
``dp-noise-multiplier * dp-clip-norm / m`` to the average of the ``m`` accepted updates
(:func:`set_updates_averaged`, called by ``server.rounds`` each round, sets ``m`` to the
updates actually averaged). This protects
what leaves the server (checkpoints, other sites), not what a site sends to it; and with
sites weighted by their example counts the bound is per site only approximately (Flower's
accounted mode needs equal weights; cmdfed reports no central epsilon).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from cmdfed.errors import CmdfedError
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.wire import WEIGHTS_KEY

WEIGHT_KEY = "num-examples"
MOMENTS = ("m_t", "v_t")


def build_strategy(config: FederationConfig, phase: str) -> Strategy:
    """A fresh strategy for one phase (phases send different groups, so moments restart)."""
    strategy = _aggregation(config, phase)
    if config.dp_mode == "central":
        return DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=config.dp_noise_multiplier,
            clipping_norm=config.dp_clip_norm,
            num_sampled_clients=config.min_sites,
        )
    return strategy


def base_strategy(strategy: Strategy) -> FedAvg:
    """The aggregation strategy itself, inside a DP wrapper or not."""
    return strategy.strategy if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) else strategy


def set_updates_averaged(strategy: Strategy, count: int) -> None:
    """Tell a central-DP wrapper how many updates this round averages: Flower sets its
    ``num_sampled_clients`` once, from the sampled sites, but the noise std
    ``sigma * clip / m`` must use the ``m`` updates actually averaged (some sites fail or are
    rejected). Other strategies need nothing."""
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        strategy.num_sampled_clients = count


def _aggregation(config: FederationConfig, phase: str) -> FedAvg:
    common = {
        "fraction_train": config.fraction_sites,
        "fraction_evaluate": config.fraction_sites,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites,
        "min_available_nodes": config.min_sites,
        "weighted_by_key": WEIGHT_KEY,
    }
    if config.strategy == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if config.strategy in ("fedadam", "fedyogi"):
        kind = FedAdam if config.strategy == "fedadam" else FedYogi
        return kind(
            **common,
            eta=config.server_lr,
            eta_l=config.lr(phase),
            beta_1=config.beta_1,
            beta_2=config.beta_2,
            tau=config.tau,
        )
    return FedAvg(**common)


def strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """The strategy's state between rounds as named tensors (empty for stateless ones)."""
    strategy = base_strategy(strategy)
    if not isinstance(strategy, FedOpt):
        return {}
    state = {}
    for moment in MOMENTS:
        for key, value in (getattr(strategy, moment) or {}).items():
            state[f"{moment}/{key}"] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`strategy_state` saved. The moments are of the packed weight vector
    (``cmdfed.federation.wire``); moments saved per tensor by an earlier cmdfed are refused."""
    strategy = base_strategy(strategy)
    if not isinstance(strategy, FedOpt):
        return
    expected = {f"{moment}/{WEIGHTS_KEY}" for moment in MOMENTS}
    if state and set(state) != expected:
        raise CmdfedError(
            f"the run folder's strategy state holds {len(state)} moment tensors, not the packed {sorted(expected)}: it "
            "was written by an earlier cmdfed; start a new run folder (or resume with the cmdfed that began it)"
        )
    for moment in MOMENTS:
        values = {k.removeprefix(f"{moment}/"): v.numpy() for k, v in state.items() if k.startswith(f"{moment}/")}
        setattr(strategy, moment, values or None)
