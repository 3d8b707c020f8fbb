"""The site's Flower ClientApp: Flower messages in, ``cmdfed.federation.local`` rounds, replies out.

Weights arrive and leave packed as one vector, with their layout in the message's config
(``cmdfed.federation.wire``); the site unpacks them and packs its reply in the same layout.
A reply holds the trained weights of the phase's sent groups (``arrays``), numbers
(``metrics``, with ``num-examples`` for weighting and, in training replies, the store's
resolution ``mpp`` when the store knows it: the one piece of its metadata that travels, so
the server can record the resolution the model trained at) and the site's name (``site``):
never an image, a path or any other metadata. The model the site builds is the one the
server describes in the message (``architecture``: the preset's, or the checkpoint's the
run started from). A site that cannot take part (missing or
damaged store, wrong classes, diverged training) replies with a Flower error whose reason
names the site and has every path cut to its last part; the full traceback stays in the
SuperNode's log at the site. The server logs the error and the round goes on without it.

Under local differential privacy the site keeps its privacy ledger in its work folder
(``cmdfed.privacy.accounting``; node config ``work-dir`` is then required); a site whose
next round would exceed its budget does not train and replies ``declined-budget = 1`` with
its spent epsilon and no weights. Its training replies then carry only ``num-examples``,
``train_seconds``, ``mpp`` and the ``dp_*`` numbers, no losses (the resolution is the
scanner's, not a statistic of the tiles), and it does not evaluate at all (its
scores are un-noised statistics of its private tiles), unless its node config has
``share-metrics = true`` (``local.shares_data_metrics``).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from cmdfed.errors import CmdfedError
from cmdfed.federation.config import FederationConfig, check_phase
from cmdfed.federation.local import (
    local_evaluate,
    local_finetune_round,
    local_pretrain_round,
    open_privacy_ledger,
    shared_metrics,
    shares_data_metrics,
)
from cmdfed.federation.site import SiteSettings, check_site_store, keep_frozen, load_frozen
from cmdfed.federation.wire import (
    ARCHITECTURE_KEY,
    LAYOUT_PREFIX,
    RESOLUTION_KEY,
    STAIN_REFERENCE_KEY,
    WEIGHTS_KEY,
    Layout,
)
from cmdfed.inference.stain import HEStains
from cmdfed.model.config import ModelConfig
from cmdfed.privacy.accounting import BudgetExhausted
from cmdfed.redaction import redact_paths

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
    layout = Layout.from_values(instructions, LAYOUT_PREFIX)
    weights = _unpacked(layout, msg.content["arrays"])
    options = {
        "device": site.device,
        "batch_size": site.batch_size,
        "proximal_mu": float(instructions.get("proximal-mu", 0.0)),
        "architecture": _architecture(instructions),
    }
    if config.dp_mode == "local":
        options["ledger"] = ledger = open_privacy_ledger(
            config, site.store, site.work_dir, str(instructions.get("run-id", "")), site.batch_size
        )
    try:
        if phase == "pretrain":
            update = local_pretrain_round(weights, site.store, config, round, site.name, **options)
        else:
            frozen = _frozen_weights(msg, site) if config.frozen_groups(phase) else {}
            update = local_finetune_round(weights, frozen, site.store, config, round, site.name, **options)
    except BudgetExhausted as exc:
        print(f"cmdfed: {site.name} declines {phase} round {round}: {exc}", flush=True)
        declined = {
            "declined-budget": 1,
            "dp_epsilon": exc.spent,
            "dp_budget_epsilon": exc.budget,
            "dp_delta": ledger.delta,
        }
        return RecordDict({"metrics": MetricRecord(declined), "site": ConfigRecord({"name": site.name})})
    metrics = shared_metrics(update.metrics, config, site.share_metrics)
    if update.mpp is not None:
        metrics[RESOLUTION_KEY] = update.mpp
    return _content(site, ArrayRecord({WEIGHTS_KEY: Array(layout.pack(update.weights))}), update.n_examples, metrics)


def _evaluate(msg: Message, site: SiteSettings, config: FederationConfig) -> RecordDict:
    phase = check_phase(str(msg.content["config"]["phase"]))
    weights = _unpacked(Layout.from_values(msg.content["config"], LAYOUT_PREFIX), msg.content["arrays"])
    frozen = _frozen_weights(msg, site) if config.frozen_groups(phase) else {}  # cached for training rounds either way
    if not shares_data_metrics(config, site.share_metrics):
        return RecordDict({"site": ConfigRecord({"name": site.name})})  # scores it would not send: not computed
    n_examples, metrics = local_evaluate(
        weights,
        frozen,
        phase,
        site.store,
        config,
        device=site.device,
        architecture=_architecture(msg.content["config"]),
        stain_reference=_stain_reference(msg.content["config"]),
    )
    return _content(site, None, n_examples, metrics)


def _stain_reference(instructions: ConfigRecord) -> HEStains | None:
    """The colours the server's model was trained on (None: it has none; tiles are scored as scanned)."""
    if STAIN_REFERENCE_KEY not in instructions:
        return None
    try:
        record = json.loads(str(instructions[STAIN_REFERENCE_KEY]))
    except json.JSONDecodeError as exc:
        raise CmdfedError(f"the server's stain reference is not JSON ({exc})") from exc
    return HEStains.from_dict(record, "the server's stain reference")


def _architecture(instructions: ConfigRecord) -> ModelConfig | None:
    """The model the server describes (None: the run's preset, from a server that sends none)."""
    if ARCHITECTURE_KEY not in instructions:
        return None
    try:
        return ModelConfig.from_dict(json.loads(str(instructions[ARCHITECTURE_KEY])))
    except json.JSONDecodeError as exc:
        raise CmdfedError(
            f"the server's model architecture is not JSON ({exc}); is the server running the same cmdfed version?"
        ) from exc


def _frozen_weights(msg: Message, site: SiteSettings) -> dict:
    """The phase's frozen groups: with the message the first time, from the site's cache after."""
    fingerprint = str(msg.content["config"]["frozen-sha"])
    if "frozen" in msg.content:
        keep_frozen(
            site, fingerprint, _unpacked(Layout.from_values(msg.content["frozen-layout"], ""), msg.content["frozen"])
        )
    return load_frozen(site, fingerprint)


def _unpacked(layout: Layout, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    if list(arrays) != [WEIGHTS_KEY]:
        raise CmdfedError(
            f"expected the weights packed as one array '{WEIGHTS_KEY}', got {len(arrays)} arrays; "
            "are the server and this site running the same cmdfed version?"
        )
    vector = arrays[WEIGHTS_KEY].numpy().copy()  # writable; the tensors are views of it
    return {name: torch.from_numpy(value) for name, value in layout.unpack(vector).items()}


def _content(site: SiteSettings, arrays: ArrayRecord | None, n_examples: int, metrics: dict[str, float]) -> RecordDict:
    records = {
        "metrics": MetricRecord({"num-examples": n_examples, **metrics}),
        "site": ConfigRecord({"name": site.name}),
    }
    return RecordDict({**({"arrays": arrays} if arrays is not None else {}), **records})


def _reply(
    msg: Message, context: Context, work: Callable[[Message, SiteSettings, FederationConfig], RecordDict]
) -> Message:
    name = str(context.node_config.get("name", "unnamed site"))
    try:
        config = FederationConfig.from_run_config(context.run_config)
        site = SiteSettings.from_node_config(context.node_config, dp_mode=config.dp_mode)
        check_site_store(site.store)
        content = work(msg, site, config)
    except Exception as exc:  # noqa: BLE001 - any failure is this site's alone: tell the server, keep details here
        traceback.print_exc()
        reason = f"[{redact_paths(name)}] {type(exc).__name__}: {redact_paths(str(exc))}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return Message(content, reply_to=msg)
