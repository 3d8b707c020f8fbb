"""The site's Flower ClientApp: Flower messages in, ``cmdfed.federation.local`` rounds, replies out.

A reply holds the trained weights of the phase's sent groups (``arrays``), numbers
(``metrics``, with ``num-examples`` for weighting) and the site's name (``site``): never
an image, a path or the store's metadata. A site that cannot take part (missing or
damaged store, wrong classes, diverged training) replies with a Flower error whose reason
names the site and has every path cut to its last part; the full traceback stays in the
SuperNode's log at the site. The server logs the error and the round goes on without it.

Under local differential privacy the site keeps its privacy ledger in its work folder
(``cmdfed.privacy.accounting``); a site whose next round would exceed its budget does not
train and replies ``declined-budget = 1`` with its spent epsilon and no weights.
"""

from __future__ import annotations

import traceback
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from cmdfed.federation.config import FederationConfig, check_phase
from cmdfed.federation.local import local_evaluate, local_finetune_round, local_pretrain_round, open_privacy_ledger
from cmdfed.federation.site import SiteSettings, check_site_store, keep_frozen, load_frozen
from cmdfed.federation.updates import redact_paths
from cmdfed.privacy.accounting import BudgetExhausted

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context, _evaluate)


def _train(msg: Message, site: SiteSettings, config: FederationConfig) -> RecordDict:
    instructions = msg.content["config"]
    phase, round = check_phase(str(instructions["phase"])), int(instructions["phase-round"])
    weights = msg.content["arrays"].to_torch_state_dict()
    options = dict(device=site.device, batch_size=site.batch_size, proximal_mu=float(instructions.get("proximal-mu", 0.0)))
    if config.dp_mode == "local":
        options["ledger"] = ledger = open_privacy_ledger(config, site.store, site.work_dir, str(instructions.get("run-id", "")), site.batch_size)
    try:
        if phase == "pretrain":
            update = local_pretrain_round(weights, site.store, config, round, site.name, **options)
        else:
            frozen = _frozen_weights(msg, site)
            update = local_finetune_round(weights, frozen, site.store, config, round, site.name, **options)
    except BudgetExhausted as exc:
        print(f"cmdfed: {site.name} declines {phase} round {round}: {exc}", flush=True)
        declined = {"declined-budget": 1, "dp_epsilon": exc.spent, "dp_budget_epsilon": exc.budget, "dp_delta": ledger.delta}
        return RecordDict({"metrics": MetricRecord(declined), "site": ConfigRecord({"name": site.name})})
    return _content(site, ArrayRecord(update.weights), update.n_examples, update.metrics)


def _evaluate(msg: Message, site: SiteSettings, config: FederationConfig) -> RecordDict:
    phase = check_phase(str(msg.content["config"]["phase"]))
    weights = msg.content["arrays"].to_torch_state_dict()
    frozen = _frozen_weights(msg, site) if phase == "finetune" else {}
    n_examples, metrics = local_evaluate(weights, frozen, phase, site.store, config, device=site.device)
    return _content(site, None, n_examples, metrics)


def _frozen_weights(msg: Message, site: SiteSettings) -> dict:
    """The phase's frozen groups: with the message the first time, from the site's cache after."""
    fingerprint = str(msg.content["config"]["frozen-sha"])
    if "frozen" in msg.content:
        keep_frozen(site, fingerprint, msg.content["frozen"].to_torch_state_dict())
    return load_frozen(site, fingerprint)


def _content(site: SiteSettings, arrays: ArrayRecord | None, n_examples: int, metrics: dict[str, float]) -> RecordDict:
    records = {"metrics": MetricRecord({"num-examples": n_examples, **metrics}), "site": ConfigRecord({"name": site.name})}
    return RecordDict({**({"arrays": arrays} if arrays is not None else {}), **records})


def _reply(msg: Message, context: Context, work: Callable[[Message, SiteSettings, FederationConfig], RecordDict]) -> Message:
    name = str(context.node_config.get("name", "unnamed site"))
    try:
        site = SiteSettings.from_node_config(context.node_config)
        check_site_store(site.store)
        content = work(msg, site, FederationConfig.from_run_config(context.run_config))
    except Exception as exc:  # any failure is this site's alone: tell the server, keep details here
        traceback.print_exc()
        reason = f"[{redact_paths(name)}] {type(exc).__name__}: {redact_paths(str(exc))}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return Message(content, reply_to=msg)
