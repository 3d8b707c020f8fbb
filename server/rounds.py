"""The federated rounds over Flower's Grid: the ServerApp's whole job.

Flower's ``Strategy.start`` runs all rounds in one loop with nowhere to checkpoint, resume
or refuse a bad update, so this module drives the strategy round by round itself:

1. wait (up to the round timeout) until ``min-sites`` sites are connected;
2. ``strategy.configure_train`` samples sites (through ``server.sampling.SamplingGrid``:
   Flower's sampling itself waits for sites with no end) and builds messages of the phase's sent
   weights, packed into one vector with its layout in the config (``cmdfed.federation.wire``:
   Flower moves every array as objects of its own); in fine-tuning a site that does not hold
   the frozen backbone yet gets it too, packed the same way;
3. send, and wait up to the round timeout for replies;
4. sort the replies: error replies and silent sites are logged as failed or timed out,
   every received content is audited, unpacked with the layout sent, and updates are
   screened (``RunCoordinator.screen``; ``PhaseRounds._screen``);
   a node replying under a site name another connected node holds is refused
   (``coordinator.SiteNames``);
5. ``strategy.aggregate_train`` averages the accepted updates (weighted by examples;
   ``PhaseRounds._aggregate``, which first tells a central-DP wrapper how many it averages
   and drops the metrics not every reply has, since Flower averages only common keys);
   the store resolution a site reports beside its example count (``mpp``) is taken out first
   (an average of resolutions means nothing) and handed to the coordinator, which records
   the phase's training resolution when the sites agree on one;
   a round without one usable update is an error that fails the run, because Flower
   itself would carry on with unchanged weights (``PhaseRounds._end_without_updates``);
6. optional federated evaluation, then the coordinator checkpoints and records the round.
   Evaluation waits for ``min-sites`` sites like training; when too few are connected within
   the round timeout (a site crashed after training), that round's federated evaluation is
   skipped with a warning and the round is still checkpointed.

Differential privacy: under central DP the strategy is Flower's server-side clipping wrapper
(``server.strategies``), told each round how many updates it averages. Under local DP a site that
has spent its budget replies ``declined-budget`` instead of an update; it is recorded as
``declined_budget``, and when every connected site was sampled and declined the run stops there,
completed: further rounds could not train at all (a resumed run would stop the same way). A site
that failed or timed out may still have budget, so a round without updates for that reason fails the
run resumably, as any round without updates. A site's privacy spend is recorded whenever its reply
reports it, also when its update is then rejected or the round fails: the site spent it.

A site that goes away mid-round (its SuperNode crashed, or lost the network) does not hold
the round up to the round timeout: Flower's SuperLink declares a SuperNode offline once it
misses its heartbeats (Flower 1.42: sent every 30 s, offline after 2 x 30 s; not
configurable) and answers its pending message with a ``NODE_UNAVAILABLE`` error from the
SuperLink itself. Replies are therefore matched to what was sent by message id, not by
sender, and such a site is recorded as failed, gone offline.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import NoReturn

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from cmdfed.errors import CmdfedError
from cmdfed.federation.config import PHASES, FederationConfig
from cmdfed.federation.coordinator import RoundReport, RunCoordinator, SiteReport
from cmdfed.federation.events import emit_event
from cmdfed.federation.wire import (
    ARCHITECTURE_KEY,
    LAYOUT_PREFIX,
    RESOLUTION_KEY,
    STAIN_REFERENCE_KEY,
    WEIGHTS_KEY,
    Layout,
)
from server.sampling import SamplingGrid, SitesMissing, wait_for_sites
from server.strategies import build_strategy, restore_strategy_state, set_updates_averaged, strategy_state

SITE_IN_REASON = re.compile(r"^\[([A-Za-z0-9][A-Za-z0-9._-]*)\] ")


class BudgetsSpent(CmdfedError):
    """Every sampled site declined the round: their privacy budgets are spent."""


def run_federation(grid: Grid, config: FederationConfig) -> None:
    """Both phases' remaining rounds; the run's telemetry status says how it ended."""
    coordinator = RunCoordinator(config)
    try:
        for phase in PHASES:
            rounds = coordinator.remaining(phase)
            if not rounds:
                continue
            strategy = build_strategy(config, phase)
            restore_strategy_state(strategy, coordinator.resumed_strategy_state(phase))
            phase_rounds = PhaseRounds(grid, coordinator, strategy, phase)
            for phase_round in rounds:
                phase_rounds.run(phase_round)
    except BudgetsSpent as exc:
        if coordinator.last_round:
            note = f"{exc}; the run stops after round {coordinator.last_round}"
        else:
            note = (
                f"no round ran: {exc}, so nothing was trained and the run has no checkpoint; "
                "to train, start a new run folder with a larger dp-epsilon"
            )
        emit_event("warning", message=note)
        coordinator.finish("completed", note=note)
        return
    except (KeyboardInterrupt, SystemExit):
        coordinator.finish("interrupted")
        raise
    except Exception as exc:
        coordinator.finish("failed", error=str(exc))
        raise
    coordinator.finish("completed")


class PhaseRounds:
    """The rounds of one phase with one strategy; remembers which sites hold the frozen weights."""

    def __init__(self, grid: Grid, coordinator: RunCoordinator, strategy: Strategy, phase: str):
        self.grid, self.coordinator, self.strategy, self.phase = grid, coordinator, strategy, phase
        self.config: FederationConfig = coordinator.config
        self.holding_frozen: set[int] = set()
        self.frozen_sha = coordinator.frozen_fingerprint(phase) if self.config.frozen_groups(phase) else ""

    def run(self, phase_round: int) -> None:
        started = time.time()
        sampling = self._sampling_grid()
        sent = self.coordinator.sent_weights(self.phase)
        layout = Layout.of(sent)
        instructions = self._instructions(phase_round, layout)
        messages = self._with_frozen(
            list(self.strategy.configure_train(phase_round, _packed(layout, sent), instructions, sampling))
        )
        replies, refused = self._exchange(messages, phase_round)
        reports, usable = self._sort(messages, replies, refused, phase_round, layout)
        accepted = self._screen(phase_round, reports, usable, layout)
        accepted_sites = {self._name(r) for r in accepted}
        resolutions = [_resolution(r.metrics) for r in reports if r.site in accepted_sites]
        _drop_metric(usable, RESOLUTION_KEY)
        if not accepted:
            self._end_without_updates(phase_round, reports, connected=len(sampling.get_node_ids()))
        new_weights, train_metrics = self._aggregate(phase_round, accepted, layout)
        eval_metrics = (
            self._evaluate(phase_round, _packed(layout, new_weights), layout)
            if self.coordinator.evaluation_due(self.phase, phase_round)
            else {}
        )
        report = RoundReport(
            started,
            reports,
            bytes_sent=sum(_payload_bytes(m.content) for m in messages),
            bytes_received=sum(_payload_bytes(r.content) for r in replies.values() if r.has_content()),
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            resolutions=resolutions,
        )
        self.coordinator.complete_round(self.phase, phase_round, new_weights, strategy_state(self.strategy), report)

    # -- the round's steps after the replies ---------------------------------------------

    def _screen(
        self, phase_round: int, reports: list[SiteReport], usable: list[Message], layout: Layout
    ) -> list[Message]:
        """The usable replies whose updates pass the coordinator's screening; the reports of
        the others say why they were rejected."""
        updates = {self._name(r): layout.unpack(r.content["arrays"][WEIGHTS_KEY].numpy()) for r in usable}
        accepted, rejected = self.coordinator.screen(self.phase, phase_round, updates)
        for report in reports:
            if report.site in rejected:
                report.status, report.error = "failed", f"update rejected: {rejected[report.site]}"
        return [r for r in usable if self._name(r) in accepted]

    def _end_without_updates(self, phase_round: int, reports: list[SiteReport], connected: int) -> NoReturn:
        """A round without one usable update ends the run (Flower would carry on with unchanged
        weights): completed when every site's budget is spent, failed (resumably) otherwise. No
        round to checkpoint, but the sites' part in it (and the privacy they spent) is recorded."""
        self.coordinator.record_sites(self.phase, phase_round, reports)
        if _budgets_spent(reports, connected=connected):
            raise BudgetsSpent(f"{self.phase} round {phase_round}: every site has spent its privacy budget")
        errors = "; ".join(f"{r.site}: {r.error or r.status}" for r in reports) or "no site was sampled"
        raise CmdfedError(f"{self.phase} round {phase_round}: no site delivered a usable update ({errors})")

    def _aggregate(self, phase_round: int, accepted: list[Message], layout: Layout) -> tuple[dict, dict]:
        """The new weights and the averaged training metrics of the accepted replies."""
        set_updates_averaged(self.strategy, len(accepted))  # central DP's noise scales with it
        _keep_common_metrics(accepted)  # Flower averages only metrics every reply has
        aggregated, train_metrics = self.strategy.aggregate_train(phase_round, accepted)
        if aggregated is None:
            raise CmdfedError(f"{self.phase} round {phase_round}: the strategy could not aggregate the updates")
        return layout.unpack(aggregated[WEIGHTS_KEY].numpy()), dict(train_metrics or {})

    # -- messages ------------------------------------------------------------------------

    def _instructions(self, phase_round: int, layout: Layout) -> ConfigRecord:
        values = {
            "phase": self.phase,
            "phase-round": phase_round,
            "round": self.config.global_round(self.phase, phase_round),
            "run-id": self.coordinator.run_id,
            **layout.to_values(LAYOUT_PREFIX),
            # The model the sites build: the preset's, or the init checkpoint's, which only the server can read.
            ARCHITECTURE_KEY: json.dumps(self.coordinator.architecture.to_dict()),
        }
        if self.coordinator.stain_reference_record is not None:
            values[STAIN_REFERENCE_KEY] = json.dumps(self.coordinator.stain_reference_record)
        if self.frozen_sha:
            values["frozen-sha"] = self.frozen_sha
        return ConfigRecord(values)

    def _with_frozen(self, messages: list[Message]) -> list[Message]:
        """Add the frozen weights to the messages of sites that do not hold them yet."""
        if not self.frozen_sha or all(m.metadata.dst_node_id in self.holding_frozen for m in messages):
            return messages  # packing the backbone every round would be work for nothing
        weights = self.coordinator.frozen_weights(self.phase)
        layout = Layout.of(weights)
        frozen, frozen_layout = _packed(layout, weights), ConfigRecord(layout.to_values(""))
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.holding_frozen:
                out.append(message)
            else:
                content = RecordDict(
                    {**dict(message.content.items()), "frozen": frozen, "frozen-layout": frozen_layout}
                )
                out.append(Message(content, dst_node_id=node, message_type=message.metadata.message_type))
        return out

    def _exchange(self, messages: list[Message], phase_round: int) -> tuple[dict[int, Message], dict[int, str]]:
        """Send and wait. Returns the replies by node, and the nodes refused for using a taken site name."""
        received = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout_s))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # the grid set the ids when sending
        # By what each replies to: a reply from the SuperLink (a node gone offline) has the SuperLink as sender.
        replies = {sent[r.metadata.reply_to_message_id]: r for r in received if r.metadata.reply_to_message_id in sent}
        claims = {node: name for node, reply in replies.items() if (name := _claimed_name(reply))}
        connected = set(self.grid.get_node_ids()) | set(claims)
        refused = {}
        for node, name in claims.items():  # in order of arrival: the first to use a name keeps it
            reason = self.coordinator.sites.claim(node, name, connected)
            if reason:
                refused[node] = reason
                emit_event(
                    "warning", message=f"{self.phase} round {phase_round}: node {node} replied as {name!r}: {reason}"
                )
        for node, reply in replies.items():
            if reply.has_error() or node in refused:
                self.holding_frozen.discard(node)  # its cache may be what failed: resend next time
            elif self.frozen_sha and "site" in reply.content.config_records:
                self.holding_frozen.add(node)
        return replies, refused

    def _sort(
        self,
        messages: list[Message],
        replies: dict[int, Message],
        refused: dict[int, str],
        phase_round: int,
        layout: Layout,
    ) -> tuple[list[SiteReport], list[Message]]:
        """Site reports for every message sent, and the replies that carry an update."""
        reports, usable = [], []
        for message in messages:
            node = message.metadata.dst_node_id
            reply = replies.get(node)
            site = f"node-{node}" if node in refused else self.coordinator.sites.name(node)
            if reply is None:
                reports.append(
                    SiteReport(site, "timed_out", error=f"no reply within {self.config.round_timeout_s:.0f} s")
                )
                continue
            metrics = {}
            if reply.has_content():  # audited whatever becomes of it
                content = reply.content
                metrics = dict(content.metric_records.get("metrics", {}))
                self.coordinator.audit(
                    self.phase, phase_round, site, _unpacked_or_as_sent(content, layout), metrics, _strings(content)
                )
            if node in refused:
                reports.append(SiteReport(site, "failed", error=refused[node]))
            elif reply.has_error():
                reports.append(SiteReport(site, "failed", error=_error_text(reply.error)))
            elif metrics.get("declined-budget") == 1:
                spent, budget = metrics.get("dp_epsilon", 0.0), metrics.get("dp_budget_epsilon", 0.0)
                reports.append(
                    SiteReport(
                        site,
                        "declined_budget",
                        0,
                        metrics,
                        error=f"privacy budget spent: epsilon {spent:.3f} of {budget:g}",
                    )
                )
            elif problem := _malformed_reply(reply.content, layout):
                reports.append(SiteReport(site, "failed", error=problem))
            else:
                n_examples = int(metrics.pop("num-examples"))
                reports.append(SiteReport(site, "trained", n_examples, metrics, metrics.get("train_seconds")))
                usable.append(reply)
        for event_report in reports:
            if event_report.status != "trained":
                emit_event(
                    "site_failed",
                    phase=self.phase,
                    round=phase_round,
                    site=event_report.site,
                    status=event_report.status,
                    error=event_report.error,
                )
        return reports, usable

    def _name(self, reply: Message) -> str:
        return self.coordinator.sites.name(reply.metadata.src_node_id)

    def _sampling_grid(self) -> SamplingGrid:
        """Wait (up to the round timeout) for ``min-sites`` sites; the grid a strategy samples them from."""
        return SamplingGrid(self.grid, wait_for_sites(self.grid, self.config.min_sites, self.config.round_timeout_s))

    def _evaluate(self, phase_round: int, arrays: ArrayRecord, layout: Layout) -> dict[str, float]:
        instructions = self._instructions(phase_round, layout)
        try:
            sampling = self._sampling_grid()
            messages = self._with_frozen(
                list(self.strategy.configure_evaluate(phase_round, arrays, instructions, sampling))
            )
        except SitesMissing as exc:  # a site crashed after training: the round's weights still count
            emit_event("warning", message=f"{self.phase} round {phase_round}: federated evaluation skipped: {exc}")
            return {}
        replies, refused = self._exchange(messages, phase_round)
        good = [
            r
            for n, r in replies.items()
            if n not in refused and r.has_content() and "metrics" in r.content.metric_records
        ]
        for node, reply in replies.items():
            if reply.has_error() and node not in refused:
                emit_event(
                    "evaluation_failed",
                    phase=self.phase,
                    round=phase_round,
                    site=self.coordinator.sites.name(node),
                    error=_error_text(reply.error),
                )
        metrics = self.strategy.aggregate_evaluate(phase_round, good) if good else None
        return dict(metrics or {})


def _resolution(metrics: dict) -> float:
    """A site's reported store resolution; NaN when it reported none (unknown) or nonsense."""
    value = metrics.get(RESOLUTION_KEY)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else float("nan")


def _drop_metric(replies: list[Message], key: str) -> None:
    """Remove ``key`` from the replies' metric records, in place (the site reports keep it)."""
    for reply in replies:
        record = reply.content["metrics"]
        if key in record:
            del record[key]


def _keep_common_metrics(replies: list[Message]) -> None:
    """Drop, in place, the metrics not every reply has: Flower averages only replies whose
    metric records have the same keys, and under local DP a site sharing its metrics
    (``share-metrics``) sends more than one that does not. The site reports keep them all."""
    common = set.intersection(*(set(r.content["metrics"].keys()) for r in replies))
    for reply in replies:
        record = reply.content["metrics"]
        for key in set(record.keys()) - common:
            del record[key]


def _budgets_spent(reports: list[SiteReport], connected: int) -> bool:
    """Whether every connected site was sampled and declined the round for its privacy budget.
    A site that failed, timed out or was not sampled may still have budget and train next
    time, so such a round fails (resumably) rather than ending the run."""
    return len(reports) >= connected > 0 and all(r.status == "declined_budget" for r in reports)


def _packed(layout: Layout, weights: dict) -> ArrayRecord:
    return ArrayRecord({WEIGHTS_KEY: Array(layout.pack(weights))})


def _unpacked_or_as_sent(content: RecordDict, layout: Layout) -> dict:
    """A reply's arrays for the audit: the named tensors when it is a float32 vector of the
    layout's size, else each array as sent (an empty one where its bytes do not decode)."""
    arrays = {k: _decoded(a) for k, a in content.get("arrays", {}).items()}
    vector = arrays.get(WEIGHTS_KEY)
    if (
        set(arrays) == {WEIGHTS_KEY}
        and isinstance(vector, np.ndarray)
        and vector.dtype == np.float32
        and vector.shape == (layout.size,)
    ):
        return layout.unpack(vector)
    return {k: v if isinstance(v, np.ndarray) else np.zeros(0, np.uint8) for k, v in arrays.items()}


def _decoded(array: Array) -> np.ndarray | None:
    """The array its bytes hold (Flower decodes them apart from the declared shape and dtype), None if
    they do not decode."""
    try:
        return array.numpy()
    except Exception:  # noqa: BLE001 - whatever numpy makes of a site's foreign bytes
        return None


def _payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (arrays' data, keys and values)."""
    return sum(
        record.count_bytes()
        for record in [
            *content.array_records.values(),
            *content.metric_records.values(),
            *content.config_records.values(),
        ]
    )


def _claimed_name(reply: Message) -> str | None:
    """The site name a reply gives: in its content, or leading its error's reason (``[site-a] ...``)."""
    if reply.has_content():
        site = reply.content.config_records.get("site")
        return str(site["name"]) if site is not None and "name" in site else None
    match = SITE_IN_REASON.match(reply.error.reason)
    return match.group(1) if match else None


def _error_text(error: Error) -> str:
    """What went wrong at a site, for the run's records: the site's own words, or the SuperLink's."""
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return (
            "the site went offline during the round: its SuperNode stopped, or stopped sending heartbeats to the "
            "SuperLink"
        )
    return SITE_IN_REASON.sub("", error.reason)


def _strings(content: RecordDict) -> dict[str, str]:
    return {
        f"{name}.{k}": v
        for name, record in content.config_records.items()
        for k, v in record.items()
        if isinstance(v, str)
    }


def _malformed_reply(content: RecordDict, layout: Layout) -> str | None:
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return "the reply must hold exactly the records 'arrays' and 'metrics'"
    arrays = content["arrays"]
    vector = _decoded(arrays[WEIGHTS_KEY]) if list(arrays) == [WEIGHTS_KEY] else None
    if vector is None or vector.dtype != np.float32 or vector.shape != (layout.size,):
        got = (
            {k: list(a.shape) for k, a in arrays.items()} if vector is None else f"{vector.dtype} {list(vector.shape)}"
        )
        return f"the reply's arrays must be one float32 vector '{WEIGHTS_KEY}' of {layout.size} values, got {got}"
    value = content["metrics"].get("num-examples")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"num-examples must be a positive integer, got {value!r}"
    return None
