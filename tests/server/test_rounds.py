"""What the server accepts as a site's reply now that weights travel packed (``cmdfed.federation.wire``),
and whole runs of rounds over an in-process grid: sites that leave, decline or fail."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from client.client_app import app as client_app
from cmdfed.errors import CmdfedError
from cmdfed.federation.checkpoints import last_complete_round
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.wire import WEIGHTS_KEY, Layout
from server.rounds import _budgets_spent, _malformed_reply, _unpacked_or_as_sent, run_federation

pytestmark = pytest.mark.usefixtures("flower_task_identity")

LAYOUT = Layout.of({"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)})


def reply(arrays: dict) -> RecordDict:
    return RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": 4})}
    )


def test_a_vector_of_the_sent_layout_is_accepted_and_audited_by_tensor_name():
    content = reply({WEIGHTS_KEY: np.arange(8, dtype=np.float32)})
    assert _malformed_reply(content, LAYOUT) is None
    audited = _unpacked_or_as_sent(content, LAYOUT)
    assert list(audited) == ["a.weight", "a.bias"] and audited["a.bias"].tolist() == [6.0, 7.0]


def test_a_vector_of_another_size_or_unpacked_tensors_are_malformed_and_audited_as_sent():
    for arrays in (
        {WEIGHTS_KEY: np.zeros(9, np.float32)},
        {"a.weight": np.zeros((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)},
        {WEIGHTS_KEY: np.zeros((2, 4), np.float32)},
    ):
        content = reply(arrays)
        assert "one float32 vector 'weights' of 8 values" in _malformed_reply(content, LAYOUT)
        assert set(_unpacked_or_as_sent(content, LAYOUT)) == set(arrays)


def test_a_reply_whose_bytes_disagree_with_its_declared_shape_or_dtype_is_malformed_not_fatal():
    # Flower decodes an Array's data apart from the shape and dtype its header declares.
    lying = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=Array(np.zeros(9, np.float32)).data)
    wrong_dtype = Array(np.arange(8, dtype=np.float64))
    garbage = Array(dtype="float32", shape=(8,), stype="numpy.ndarray", data=b"not an array")
    for array in (lying, wrong_dtype, garbage):
        content = RecordDict(
            {"arrays": ArrayRecord({WEIGHTS_KEY: array}), "metrics": MetricRecord({"num-examples": 4})}
        )
        assert "one float32 vector" in _malformed_reply(content, LAYOUT)
        assert "a.weight" not in _unpacked_or_as_sent(content, LAYOUT)


# -- whole runs over an in-process grid ------------------------------------------------------
# Flower's Grid is the transport: here it hands each message to the real ClientApp in this process
# (the server's rounds, the coordinator and the sites' code are all the real ones), and a test
# can take a site off the grid the way a crashed SuperNode leaves the SuperLink.

CLASSES = "epithelial,lymphocyte,stromal"


class InProcessGrid(Grid):
    """Flower's Grid over ClientApp calls in this process; ``leave_after_train`` nodes disconnect
    once they have answered a training message (a SuperNode that crashed after training)."""

    def __init__(
        self, node_configs: dict[int, dict], config: FederationConfig, leave_after_train: tuple[int, ...] = ()
    ):
        self.node_configs, self.run_config = node_configs, config.to_run_config()
        self.connected = set(node_configs)
        self.leave_after_train = set(leave_after_train)

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return sorted(self.connected)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids set it
            node = message.metadata.dst_node_id
            if node not in self.connected:
                continue  # no reply within the timeout
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.node_configs[node],
                state=RecordDict(),
                run_config=self.run_config,
            )
            replies.append(client_app(message, context))
            if message.metadata.message_type == "train" and node in self.leave_after_train:
                self.connected.discard(node)
        return replies


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from cmdfed.data.synth import write_synthetic_store

    root = tmp_path_factory.mktemp("round-sites")
    for k in (1, 2):
        write_synthetic_store(root / f"site{k}.zarr", 4, site=k, seed=k, tile_size=64)
    return root


def run_config(tmp_path, **overrides) -> FederationConfig:
    values = {
        "run_dir": str(tmp_path / "run"),
        "classes": CLASSES,
        "pretrain_rounds": 1,
        "finetune_rounds": 0,
        "local_steps": 1,
        "batch_size": 2,
        "eval_tiles": 2,
        "augment": False,
        "min_sites": 2,
        "round_timeout_s": 2.0,
    }
    return FederationConfig(**{**values, **overrides})


def sites(stores, tmp_path, *store_names: str) -> dict[int, dict]:
    return {
        k: {"store": str(stores / name), "name": f"site-{k}", "work-dir": str(tmp_path / f"work{k}"), "device": "cpu"}
        for k, name in enumerate(store_names, start=1)
    }


def run_within(grid: InProcessGrid, config: FederationConfig, seconds: float) -> BaseException | None:
    """run_federation in a thread; fails the test if it has not returned within ``seconds``."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            run_federation(grid, config)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run did not return within {seconds:.0f} s"
    return outcome[0]


def events(capsys) -> list[dict]:
    return [
        json.loads(line.split(" ", 1)[1])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("cmdfed-event ")
    ]


def test_a_site_gone_after_training_skips_federated_evaluation_instead_of_hanging(stores, tmp_path, capsys):
    config = run_config(tmp_path, eval_every=1)
    grid = InProcessGrid(sites(stores, tmp_path, "site1.zarr", "site2.zarr"), config, leave_after_train=(2,))
    assert run_within(grid, config, 180) is None
    assert last_complete_round(config.run_dir).round == 1  # the round's weights are kept
    warnings = [e["message"] for e in events(capsys) if e["event"] == "warning"]
    assert any("pretrain round 1: federated evaluation skipped: only 1 of the 2 sites" in w for w in warnings), warnings
    db = sqlite3.connect(tmp_path / "run" / "telemetry.db")
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]


def test_a_run_whose_sites_all_decline_ends_completed_and_says_no_round_ran(stores, tmp_path, capsys):
    # Neither site can afford one round of its budget.
    config = run_config(tmp_path, dp_mode="local", dp_noise_multiplier=1.0, dp_epsilon=0.01)
    node_configs = sites(stores, tmp_path, "site1.zarr", "site2.zarr")
    for attempt in (1, 2):  # a resumed run ends the same way, not failed
        assert run_within(InProcessGrid(node_configs, config), config, 180) is None
        finish = next(e for e in events(capsys) if e["event"] == "finish")
        assert finish["status"] == "completed" and finish["rounds"] == 0
        assert finish["note"].startswith("no round ran: pretrain round 1: every site has spent its privacy budget"), (
            finish
        )
        assert "larger dp-epsilon" in finish["note"]
    assert last_complete_round(config.run_dir) is None
    db = sqlite3.connect(tmp_path / "run" / "telemetry.db")
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]


def test_sites_sharing_and_not_sharing_their_metrics_train_together_under_local_dp(stores, tmp_path):
    config = run_config(tmp_path, dp_mode="local", dp_noise_multiplier=1.0, dp_epsilon=50.0, eval_every=0)
    node_configs = sites(stores, tmp_path, "site1.zarr", "site2.zarr")
    node_configs[1]["share-metrics"] = True
    assert run_within(InProcessGrid(node_configs, config), config, 180) is None
    assert last_complete_round(config.run_dir).round == 1


def test_budgets_are_spent_only_when_every_connected_site_was_asked_and_declined():
    from cmdfed.federation.coordinator import SiteReport

    declined = [SiteReport("site-1", "declined_budget"), SiteReport("site-2", "declined_budget")]
    assert _budgets_spent(declined, connected=2)
    assert not _budgets_spent(declined, connected=4)  # fraction-sites sampled only the spent ones
    assert not _budgets_spent([declined[0], SiteReport("site-3", "timed_out")], connected=2)
    assert not _budgets_spent([], connected=0)


def test_a_declined_site_beside_a_failed_one_fails_the_round_resumably(stores, tmp_path):
    # site 1 cannot afford a round; site 2 fails (its store is missing) but might still have budget.
    config = run_config(tmp_path, dp_mode="local", dp_noise_multiplier=1.0, dp_epsilon=0.01)
    error = run_within(InProcessGrid(sites(stores, tmp_path, "site1.zarr", "missing.zarr"), config), config, 180)
    assert isinstance(error, CmdfedError) and "no site delivered a usable update" in str(error)
    db = sqlite3.connect(tmp_path / "run" / "telemetry.db")
    assert db.execute("SELECT site, status FROM site_rounds ORDER BY site").fetchall() == [
        ("site-1", "declined_budget"),
        ("site-2", "failed"),
    ]


def test_privacy_spent_in_a_round_whose_updates_were_all_rejected_is_recorded(stores, tmp_path):
    # An absurd norm limit rejects both sites' updates after they trained (and spent) under local DP.
    config = run_config(
        tmp_path, dp_mode="local", dp_noise_multiplier=1.0, dp_epsilon=50.0, update_norm_limit=1e-9, eval_every=0
    )
    error = run_within(InProcessGrid(sites(stores, tmp_path, "site1.zarr", "site2.zarr"), config), config, 180)
    assert isinstance(error, CmdfedError) and "no site delivered a usable update" in str(error)
    db = sqlite3.connect(tmp_path / "run" / "telemetry.db")
    assert db.execute("SELECT site, status FROM site_rounds ORDER BY site").fetchall() == [
        ("site-1", "failed"),
        ("site-2", "failed"),
    ]
    spent = db.execute("SELECT site, round, epsilon, budget_epsilon FROM privacy ORDER BY site").fetchall()
    assert [(s, r, b) for s, r, _, b in spent] == [("site-1", 1, 50.0), ("site-2", 1, 50.0)] and all(
        e > 0 for _, _, e, _ in spent
    )


# -- starting from a checkpoint, fine-tuning end to end --------------------------------------


# The stains a checkpoint records of its training tiles (cmdfed.inference.stain): CPM-15 01-07's.
STAINS = {
    "method": "macenko",
    "hematoxylin": [0.555403, 0.750412, 0.358343],
    "eosin": [0.126538, 0.858693, 0.496623],
    "max_concentrations": [2.339399, 1.398886],
}


def pretrained_checkpoint(path, **overrides):
    """A pretraining checkpoint as `cmdfed train pretrain` writes it, of a tiny model with ``overrides``."""
    from cmdfed.model.checkpoint import save_checkpoint
    from cmdfed.model.config import ModelConfig
    from cmdfed.model.unet import build_model

    config = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(42)
    save_checkpoint(
        path,
        5,
        config={
            "phase": "pretrain",
            "model": config.to_dict(),
            "class_names": ["background", "nucleus"],
            "stain_reference": STAINS,
        },
        weights=build_model(config).state_dict(),
    )
    return path


def test_a_run_from_a_checkpoint_fine_tunes_it_end_to_end_and_records_where_it_started(stores, tmp_path, capsys):
    from cmdfed.model.checkpoint import load_checkpoint
    from server.federate import evaluation_lines

    # Heads narrower than the preset's: the sites build the server's architecture, not the preset's.
    init = pretrained_checkpoint(tmp_path / "pretrained", head_width=16)
    config = run_config(
        tmp_path,
        init=str(init),
        pretrain_rounds=0,
        finetune_rounds=1,
        finetune_trainable="all",
        server_eval_store=str(stores / "site1.zarr"),
        eval_every=1,
    )
    assert run_within(InProcessGrid(sites(stores, tmp_path, "site1.zarr", "site2.zarr"), config), config, 300) is None
    start = load_checkpoint(init).weights
    last = load_checkpoint(config.run_dir)
    assert last.config["phase"] == "finetune" and last.config["model"]["head_width"] == 16
    assert last.config["init"]["init"] == str(init) and len(last.config["init"]["sha256"]) == 64
    assert last.config["mpp"] == 0.5  # both sites' stores are at 0.5 um/px: edge export needs no --mpp
    # The init's stains, which the server and sites evaluated with: no site's colours left it.
    assert last.config["stain_reference"] == STAINS
    backbone = [k for k in start if not k.startswith("heads.") and k in last.weights]
    assert any(not torch.equal(start[k], last.weights[k]) for k in backbone)  # trained end to end
    (round_event,) = [e for e in events(capsys) if e["event"] == "round"]
    lines = evaluation_lines(round_event["metrics"])
    assert lines[0].startswith("server evaluation on 2 tiles: PQ ") and ", AJI " in lines[0] and ", Dice " in lines[0]
    assert lines[1].startswith("site evaluation") and "PQ " in lines[1]
    db = sqlite3.connect(tmp_path / "run" / "telemetry.db")
    (metrics,) = db.execute("SELECT metrics FROM rounds").fetchone()
    assert {"server_pq", "server_aji", "server_dice"} <= set(json.loads(metrics))  # and in telemetry, as before
    assert "train_mpp" not in json.loads(metrics)  # resolutions are recorded, never averaged


@pytest.mark.parametrize("dp, trainable", [("local", "all"), ("central", "all"), ("local", "heads+modulation")])
def test_finetuning_more_than_the_heads_works_under_differential_privacy(stores, tmp_path, dp, trainable):
    # DP-SGD needs a per-tile gradient of every trainable parameter: the diffusion output layer, which
    # segmentation does not use, stays frozen in fine-tuning (it travels unchanged).
    privacy = {"dp_mode": dp, "dp_noise_multiplier": 1.0} | ({"dp_epsilon": 50.0} if dp == "local" else {})
    config = run_config(
        tmp_path, pretrain_rounds=0, finetune_rounds=1, finetune_trainable=trainable, eval_every=0, **privacy
    )
    assert run_within(InProcessGrid(sites(stores, tmp_path, "site1.zarr", "site2.zarr"), config), config, 300) is None
    assert last_complete_round(config.run_dir).phase == "finetune"
