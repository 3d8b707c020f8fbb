"""The server's bookkeeping of a federated run, free of Flower: ``RunCoordinator``.

The Flower ServerApp (``server/``) moves messages and runs the strategy; everything it
decides with or records goes through this object:

* **where to start**: a new run initialises the model from the run seed, or from the
  checkpoint ``init`` names (``init.py``: its architecture and weights, pinned in run.json
  and recorded in every round checkpoint); a run folder with
  round checkpoints resumes after the last complete one (``checkpoints.py``), with the
  strategy state saved beside it, so no round is lost or counted twice. ``run.json`` pins
  the settings a resumed run must keep (``FederationConfig.resume_key``) and the run's
  telemetry id, so a resumed run continues the same telemetry rows.
* **what travels**: the sent groups of the global weights each round, and the frozen groups
  once per site and phase, identified by a fingerprint.
* **who is who**: sites name themselves in their replies; ``SiteNames`` keeps one node per
  name, so two sites started with the same name are not mixed up in averaging or telemetry.
* **what is accepted**: updates are screened (``updates.screen_updates``) before averaging.
* **what is kept**: after each round the global weights and strategy state (checkpoint),
  round and per-site rows with timings and bytes (telemetry), the phase's training
  resolution (``mpp``, when every site whose update was averaged reported the same one,
  so ``cmdfed edge export`` of a round needs no ``--mpp``), a line per received message
  in ``received.jsonl`` (which keys, dtypes and numbers each site sent: an audit that no
  image or path left a site), and a progress event on stdout for ``cmdfed federate``.

Telemetry is for watching, not for training: a telemetry store that fails is reported once
and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdfed.atomic import json_safe, write_json_atomic
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.federation.checkpoints import last_complete_round, prune_rounds, save_round
from cmdfed.federation.config import PHASES, FederationConfig
from cmdfed.federation.events import emit_event
from cmdfed.federation.init import check_pinned_init, load_initial_weights
from cmdfed.federation.local import evaluate_on_store, open_site, site_model
from cmdfed.federation.site import weights_fingerprint
from cmdfed.federation.updates import screen_updates
from cmdfed.inference.stain import REFERENCE_KEY, HEStains
from cmdfed.model.checkpoint import model_version
from cmdfed.model.config import ModelConfig
from cmdfed.model.unet import ConvNeXtUNet, build_model
from cmdfed.telemetry import TelemetryStore
from cmdfed.train.device import select_device
from cmdfed.train.phases import training_mpp

NumpyWeights = dict[str, np.ndarray]


@dataclass
class SiteReport:
    site: str
    status: str  # trained | failed | timed_out | declined_budget (telemetry's site statuses)
    n_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    error: str | None = None


@dataclass
class RoundReport:
    started_at: float
    sites: list[SiteReport]
    bytes_sent: int
    bytes_received: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    resolutions: list[float] = field(default_factory=list)  # mpp of each averaged site's store, NaN when unknown


class SiteNames:
    """Which Flower node speaks for which site, from the names sites give in their replies.

    The first node to use a name holds it while it stays connected; another node that
    replies under that name meanwhile is refused (its replies are not averaged, and it is
    recorded as ``node-ID``, not under the name). A connected node is a duplicate: the same
    site started twice would count its tiles twice, two sites sharing a name would be one
    line in telemetry. Once the holder has gone (a stopped or crashed SuperNode), the name
    passes to the node that uses it next: that is a site restarted, which Flower gives a
    new node id (unless it authenticates with its key, which keeps its id).
    """

    def __init__(self) -> None:
        self._holder: dict[str, int] = {}
        self._name: dict[int, str] = {}

    def claim(self, node: int, name: str, connected: Collection[int]) -> str | None:
        """Record that ``node`` replied as site ``name``; the reason it is refused, or None.

        ``connected``: the nodes alive now, counting every node that replied this round.
        """
        holder = self._holder.get(name)
        if holder is not None and holder != node and holder in connected:
            return (
                f"another connected node ({holder}) already takes part as site {name!r}, so this node's "
                f"replies are refused; give each site its own name (node config name=..., `cmdfed client "
                f"start --name`) and restart this one. A site restarted after a crash is let in once its "
                f"old connection has expired (about a minute)"
            )
        if holder is not None and holder != node:
            del self._name[holder]  # the holder has gone: this is the site restarted
        previous = self._name.get(node)
        if previous is not None and previous != name:
            del self._holder[previous]
        self._holder[name], self._name[node] = node, name
        return None

    def name(self, node: int) -> str:
        """The site a node holds the name of; ``node-ID`` for one that has not named itself."""
        return self._name.get(node, f"node-{node}")


class RunCoordinator:
    """Global weights, resume point, screening and records of one run folder."""

    def __init__(self, config: FederationConfig):
        self.config = config
        check_server_eval_store(config)  # before any site spends compute (or privacy) on a run that would fail
        self.run_dir = Path(config.run_dir).expanduser().absolute()
        last = last_complete_round(self.run_dir)
        # A new run's init is checked before the run folder is made; a resumed one needs it no more.
        initial = load_initial_weights(config) if last is None and config.init else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.init = self._pin_run(initial.record if initial else None)
        self.architecture = ModelConfig.from_dict(self.init["architecture"]) if self.init else config.architecture()
        self.sites = SiteNames()
        self._telemetry_failed = False
        self.telemetry = self._open_telemetry()
        self._resolutions: dict[str, list[float]] = {phase: [] for phase in PHASES}
        if last is None:
            torch.manual_seed(config.seed)  # fresh groups (all, or the heads of a pretrained init) come from the seed
            model = build_model(config.model_config("pretrain", self.architecture))
            if initial is not None:
                try:
                    model.load_partial_state_dict(initial.weights, initial.groups)
                except CmdfedError as exc:
                    raise CmdfedError(f"init {config.init}: {exc}") from exc
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.done: tuple[str, int] = ("pretrain", 0)
            self.last_round, self.strategy_state = 0, {}
        else:
            self.weights, self.done = last.weights, (last.phase, last.phase_round)
            self.last_round, self.strategy_state = last.round, last.strategy_state
            mpp = last.config.get(
                "mpp"
            )  # the phase so far agreed on it, or did not (None, or a round before mpp was kept)
            self._resolutions[last.phase] = [float(mpp) if isinstance(mpp, (int, float)) else float("nan")]
        self._record(
            "start_run",
            self.run_id,
            name=config.name,
            config=config.to_dict(),
            strategy=config.strategy,
            phases=[p for p in PHASES if config.rounds(p)],
        )
        emit_event(
            "start",
            run_id=self.run_id,
            resumed_after=self.last_round,
            run_dir=str(self.run_dir),
            rounds={p: config.rounds(p) for p in PHASES},
            **({"init": {k: self.init[k] for k in ("init", "sha256", "heads")}} if self.init else {}),
        )

    # -- plan ----------------------------------------------------------------------------

    def remaining(self, phase: str) -> range:
        """Rounds of ``phase`` still to run (1-based, within the phase)."""
        done_phase, done_round = self.done
        if PHASES.index(done_phase) > PHASES.index(phase):
            return range(0)
        first = done_round + 1 if done_phase == phase else 1
        return range(first, self.config.rounds(phase) + 1)

    def resumed_strategy_state(self, phase: str) -> dict[str, torch.Tensor]:
        """The strategy state to continue ``phase`` with: the saved one mid-phase, else none."""
        done_phase, done_round = self.done
        return self.strategy_state if done_phase == phase and done_round > 0 else {}

    # -- what travels --------------------------------------------------------------------

    def _groups(self, groups: tuple[str, ...]) -> NumpyWeights:
        return {k: v.numpy() for k, v in self.weights.items() if ConvNeXtUNet.group_of(k) in groups}

    def sent_weights(self, phase: str) -> NumpyWeights:
        return self._groups(self.config.sent_groups(phase))

    def frozen_weights(self, phase: str) -> NumpyWeights:
        return self._groups(self.config.frozen_groups(phase))

    def frozen_fingerprint(self, phase: str) -> str:
        """What a site caches the frozen groups under (``site.weights_fingerprint``)."""
        return weights_fingerprint(self.frozen_weights(phase))

    # -- screening and records -----------------------------------------------------------

    def screen(self, phase: str, round: int, updates: Mapping[str, NumpyWeights]) -> tuple[list[str], dict[str, str]]:
        accepted, rejected = screen_updates(self.sent_weights(phase), updates, self.config.update_norm_limit)
        for site, reason in rejected.items():
            emit_event("rejected", phase=phase, round=round, site=site, reason=reason)
        return accepted, rejected

    def audit(
        self,
        phase: str,
        round: int,
        site: str,
        arrays: Mapping[str, np.ndarray],
        metrics: Mapping[str, Any],
        strings: Mapping[str, str],
    ) -> None:
        """Append what one site sent in one round to ``received.jsonl``."""
        model_keys = set(self.weights)
        line = {
            "phase": phase,
            "round": round,
            "site": site,
            "at": time.time(),
            "arrays": len(arrays),
            "array_bytes": int(sum(a.nbytes for a in arrays.values())),
            "dtypes": sorted({str(a.dtype) for a in arrays.values()}),
            "non_parameter_keys": sorted(k for k in arrays if k not in model_keys),
            "largest_shape": list(max((a.shape for a in arrays.values()), key=np.prod, default=())),
            "metrics": dict(metrics),
            "strings": dict(strings),
        }
        with open(self.run_dir / "received.jsonl", "a") as f:
            f.write(json.dumps(json_safe(line), default=str) + "\n")

    def complete_round(
        self,
        phase: str,
        phase_round: int,
        aggregated: NumpyWeights,
        strategy_state: dict[str, torch.Tensor],
        report: RoundReport,
    ) -> Path:
        """Adopt the aggregated weights; checkpoint, record and announce the round."""
        for key, value in aggregated.items():
            self.weights[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        round = self.config.global_round(phase, phase_round)
        server_metrics = self.server_evaluate(phase, phase_round)
        metrics = {
            **{f"train_{k}": v for k, v in report.train_metrics.items()},
            **{f"eval_{k}": v for k, v in report.eval_metrics.items()},
            **server_metrics,
        }
        model_config = self.config.model_config(phase, self.architecture)
        resolutions = [*self._resolutions[phase], *(report.resolutions or [float("nan")])]
        path = save_round(
            self.run_dir,
            round=round,
            phase=phase,
            phase_round=phase_round,
            weights=self.weights,
            strategy_state=strategy_state,
            metrics=metrics,
            config={
                "model": model_config.to_dict(),
                "class_names": self.config.class_names,
                "federation": self.config.to_dict(),
                "name": self.config.name,
                "run_id": self.run_id,
                "mpp": training_mpp(resolutions),
                "init": self.init,
                REFERENCE_KEY: self.stain_reference_record,
            },
        )
        self._resolutions[phase] = resolutions
        prune_rounds(
            self.run_dir,
            self.config.keep_rounds,
            protected={self.config.global_round("pretrain", self.config.pretrain_rounds)},
        )
        self.done, self.last_round, self.strategy_state = (phase, phase_round), round, strategy_state
        finished = time.time()
        failed = [s for s in report.sites if s.status in ("failed", "timed_out")]  # a declined site did not fail
        self._record(
            "record_round",
            self.run_id,
            phase=phase,
            round=round,
            started_at=report.started_at,
            finished_at=finished,
            n_sites=len(report.sites),
            n_failed=len(failed),
            bytes_sent=report.bytes_sent,
            bytes_received=report.bytes_received,
            metrics=metrics,
        )
        self.record_sites(phase, phase_round, report.sites)
        emit_event(
            "round",
            phase=phase,
            phase_round=phase_round,
            phase_rounds=self.config.rounds(phase),
            round=round,
            seconds=finished - report.started_at,
            bytes_sent=report.bytes_sent,
            bytes_received=report.bytes_received,
            metrics=metrics,
            sites=[s.__dict__ for s in report.sites],
            checkpoint=path.name,
        )
        return path

    def record_sites(self, phase: str, phase_round: int, sites: list[SiteReport]) -> None:
        """Each site's part in a round, and the privacy it spent (local DP), in telemetry.

        The spend is recorded whenever a site reports it, whatever became of its update
        (rejected by the screen, or the round failed): the site spent it all the same. A site
        that declined spent nothing this round; its last spend is already recorded."""
        round = self.config.global_round(phase, phase_round)
        for site in sites:
            self._record(
                "record_site_round",
                self.run_id,
                phase=phase,
                round=round,
                site=site.site,
                status=site.status,
                n_examples=site.n_examples,
                metrics=site.metrics,
                duration_s=site.duration_s,
                error=site.error,
            )
            if site.status != "declined_budget" and _reports_privacy(site.metrics):
                m = site.metrics
                self._record(
                    "record_privacy",
                    self.run_id,
                    phase=phase,
                    round=round,
                    site=site.site,
                    epsilon=m["dp_epsilon"],
                    delta=m["dp_delta"],
                    noise_multiplier=m["dp_noise_multiplier"],
                    max_grad_norm=m["dp_max_grad_norm"],
                    budget_epsilon=m["dp_budget_epsilon"],
                )

    def server_evaluate(self, phase: str, phase_round: int) -> dict[str, float]:
        """Central evaluation on the server's own labelled store, when the run names one."""
        config = self.config
        if not config.server_eval_store or not _due(config.server_eval_every, config.rounds(phase), phase_round):
            return {}
        sent = {k: v for k, v in self.weights.items() if ConvNeXtUNet.group_of(k) in config.sent_groups(phase)}
        frozen = {k: v for k, v in self.weights.items() if ConvNeXtUNet.group_of(k) in config.frozen_groups(phase)}
        model = site_model(config, phase, sent, frozen, select_device("auto"), self.architecture)
        tiles, metrics = evaluate_on_store(
            model, phase, config.server_eval_store, config, self.stain_reference, remedy=SERVER_STORE_REMEDY
        )
        return {"server_tiles": tiles, **{f"server_{k}": v for k, v in metrics.items()}}

    @property
    def stain_reference_record(self) -> dict | None:
        """The init's stain reference as its checkpoint recorded it (None: images are evaluated as scanned)."""
        return (self.init or {}).get(REFERENCE_KEY)

    @property
    def stain_reference(self) -> HEStains | None:
        record = self.stain_reference_record
        return None if record is None else HEStains.from_dict(record, f"init {self.config.init}")

    def evaluation_due(self, phase: str, phase_round: int) -> bool:
        return _due(self.config.eval_every, self.config.rounds(phase), phase_round)

    def finish(self, status: str, error: str | None = None, note: str | None = None) -> None:
        """Close the run's telemetry: its status and, when completed, the final model version.
        ``note``: why a completed run ended as it did (e.g. no round ran: budgets spent)."""
        if status == "completed" and self.last_round:
            path = self.run_dir / f"round-{self.last_round:04d}"
            sha = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
            version = model_version(self.config.name, sha, round=self.last_round)
            self._record(
                "record_model_version",
                version,
                run_id=self.run_id,
                round=self.last_round,
                metrics={"checkpoint": path.name},
                checkpoint_sha256=sha,
            )
        self._record("finish_run", self.run_id, status=status)
        emit_event("finish", status=status, rounds=self.last_round, error=error, **({"note": note} if note else {}))
        if self.telemetry is not None:
            self.telemetry.close()

    # -- internals -----------------------------------------------------------------------

    def _pin_run(self, init: dict | None) -> tuple[str, dict | None]:
        """The run's id and init record: pinned in ``run.json`` by a new run, read back by a resumed one.

        ``init``: the record of the weights a run with no round yet starts from (None otherwise)."""
        path = self.run_dir / "run.json"
        key = self.config.resume_key()
        if path.is_file():
            try:
                pinned = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise CmdfedError(f"{path} is unreadable ({exc}); the run folder is damaged") from exc
            # A key a run folder predates holds its default there (e.g. init, added later).
            before = {**FederationConfig().resume_key(), **pinned["config"]}
            changed = sorted(k for k in set(key) | set(before) if key.get(k) != before.get(k))
            if changed:
                raise CmdfedError(
                    f"{self.run_dir} holds a run whose settings differ in {', '.join(changed)}; "
                    "resume it with the same settings or choose a new run folder"
                )
            if init is not None:
                check_pinned_init(pinned.get("init"), init, path)
            return str(pinned["run_id"]), pinned.get("init") or init
        run_id = uuid.uuid4().hex
        write_json_atomic(
            path, {"run_id": run_id, "config": key, "created_at": time.time(), **({"init": init} if init else {})}
        )
        return run_id, init

    def _open_telemetry(self) -> TelemetryStore | None:
        target = self.config.telemetry or str(self.run_dir / "telemetry.db")
        try:
            return TelemetryStore.open(target, create=True)
        except CmdfedError as exc:
            self._telemetry_error(exc)
            return None

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.telemetry is None:
            return
        try:
            getattr(self.telemetry, method)(*args, **kwargs)
        except CmdfedError as exc:
            self._telemetry_error(exc)

    def _telemetry_error(self, exc: CmdfedError) -> None:
        if not self._telemetry_failed:
            self._telemetry_failed = True
            print(f"cmdfed: telemetry not recorded: {exc}", file=sys.stderr, flush=True)
            emit_event("warning", message=f"telemetry not recorded: {exc}")


SERVER_STORE_REMEDY = (
    "set server-eval-store to a labelled store on the server imported with the run's classes "
    "(`cmdfed data import ...`), or leave server-eval-store empty to evaluate at the sites only"
)


def check_server_eval_store(config: FederationConfig) -> None:
    """Refuse a run whose ``server-eval-store`` cannot score its rounds: missing, not a store,
    other classes, or no labelled tiles for fine-tuning's metrics."""
    path = config.server_eval_store
    if not path or config.server_eval_every == 0:
        return
    try:
        SiteStore.open(path)
    except CmdfedError as exc:  # missing, not a store, unreadable
        raise CmdfedError(f"server-eval-store: {exc}; {SERVER_STORE_REMEDY}") from exc
    try:
        store = open_site(path, config, remedy=SERVER_STORE_REMEDY)
    except CmdfedError as exc:  # other classes
        raise CmdfedError(f"server-eval-store: {exc}") from exc
    if len(store) == 0:
        raise CmdfedError(f"server-eval-store {path} has no tiles; {SERVER_STORE_REMEDY}")
    if config.finetune_rounds and not store.labelled_indices().size:
        raise CmdfedError(
            f"server-eval-store {path} has no labelled tiles to score fine-tuning on; {SERVER_STORE_REMEDY}"
        )


PRIVACY_METRICS = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_max_grad_norm", "dp_budget_epsilon")


def _reports_privacy(metrics: Mapping[str, Any]) -> bool:
    """Whether a site's metrics hold a whole privacy report (``local.privacy_metrics``)."""
    return all(
        isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool) for k in PRIVACY_METRICS
    )


def _due(every: int, phase_rounds: int, phase_round: int) -> bool:
    """Evaluate every ``every`` rounds of a phase (never for 0) and always after its last round."""
    return every > 0 and (phase_round % every == 0 or phase_round == phase_rounds)
