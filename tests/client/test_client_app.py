"""The ClientApp called as a SuperNode calls it, in process: what a site sends back.

Message inspection: a reply holds only the model's float32 weights of the phase's sent
groups, numbers, and the site's name; a site that cannot train replies with an error that
names no folder.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.client_app import app
from cmdfed.data.synth import write_synthetic_store
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.site import SiteSettings, weights_fingerprint
from cmdfed.federation.wire import LAYOUT_PREFIX, STAIN_REFERENCE_KEY, WEIGHTS_KEY, Layout
from cmdfed.model.unet import build_model

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CONFIG = FederationConfig(
    classes="epithelial,lymphocyte,stromal", local_steps=1, batch_size=2, eval_tiles=2, augment=False
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("site") / "site.zarr"
    write_synthetic_store(path, 4, site=1, seed=1, tile_size=64)
    return path


def context(store, work_dir, name="site-a") -> Context:
    node_config = {"store": str(store), "name": name, "work-dir": str(work_dir), "device": "cpu"}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=CONFIG.to_run_config())


def packed(weights: dict) -> tuple[ArrayRecord, Layout]:
    layout = Layout.of(weights)
    return ArrayRecord({WEIGHTS_KEY: Array(layout.pack(weights))}), layout


def message(kind: str, phase: str, model, extra: dict | None = None) -> Message:
    arrays, layout = packed(model.state_dict_for(CONFIG.sent_groups(phase)))
    config = {"phase": phase, "phase-round": 1, "round": 1, **layout.to_values(LAYOUT_PREFIX), **(extra or {})}
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=7, message_type=kind)


def reply_weights(reply: Message, model, phase: str) -> dict:
    """The reply's vector unpacked with the layout that was sent, as the server does."""
    ((key, array),) = reply.content["arrays"].items()
    assert key == WEIGHTS_KEY and array.dtype == "float32"
    return Layout.of(model.state_dict_for(CONFIG.sent_groups(phase))).unpack(array.numpy())


def assert_only_weights_and_numbers(reply: Message, model, phase: str, store) -> None:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    expected = model.state_dict_for(CONFIG.sent_groups(phase))
    arrays = reply_weights(reply, model, phase)
    assert list(arrays) == list(expected)
    for key, value in arrays.items():
        assert value.dtype == np.float32 and value.shape == tuple(expected[key].shape)
        assert np.isfinite(value).all()
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    strings = [v for record in content.config_records.values() for v in record.values()]
    assert strings == ["site-a"] and not any(str(store.parent) in str(s) for s in strings)


def test_pretrain_reply_holds_backbone_and_modulation_weights_and_numbers(store, tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG.model_config("pretrain"))
    reply = app(message(MessageType.TRAIN, "pretrain", model), context(store, tmp_path))
    assert_only_weights_and_numbers(reply, model, "pretrain", store)
    assert reply.content["metrics"]["num-examples"] == 4


def test_finetune_receives_the_frozen_backbone_once_then_only_heads(store, tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG.model_config("finetune"))
    frozen = {k: v.numpy() for k, v in model.state_dict_for(CONFIG.frozen_groups("finetune")).items()}
    sha = weights_fingerprint(frozen)
    first = message(MessageType.TRAIN, "finetune", model, {"frozen-sha": sha})
    first.content["frozen"], frozen_layout = packed(frozen)
    first.content["frozen-layout"] = ConfigRecord(frozen_layout.to_values(""))
    assert_only_weights_and_numbers(app(first, context(store, tmp_path)), model, "finetune", store)

    later = message(MessageType.TRAIN, "finetune", model, {"frozen-sha": sha})  # heads and fingerprint only
    reply = app(later, context(store, tmp_path))
    assert_only_weights_and_numbers(reply, model, "finetune", store)
    assert all(k.startswith("heads.") for k in reply_weights(reply, model, "finetune"))

    evaluation = app(message(MessageType.EVALUATE, "finetune", model, {"frozen-sha": sha}), context(store, tmp_path))
    assert not evaluation.has_error() and not evaluation.content.array_records
    assert {"num-examples", "dice", "pq"} <= set(evaluation.content["metrics"])

    # Scored re-stained as the init's training images when the server sends their stains.
    stains = '{"method": "macenko", "hematoxylin": [0.56, 0.75, 0.36], "eosin": [0.13, 0.86, 0.5], '
    stains += '"max_concentrations": [2.3, 1.4]}'
    restained = {"frozen-sha": sha, STAIN_REFERENCE_KEY: stains}
    evaluation = app(message(MessageType.EVALUATE, "finetune", model, restained), context(store, tmp_path))
    assert not evaluation.has_error() and "pq" in evaluation.content["metrics"]
    garbled = {"frozen-sha": sha, STAIN_REFERENCE_KEY: stains[:40]}
    evaluation = app(message(MessageType.EVALUATE, "finetune", model, garbled), context(store, tmp_path))
    assert evaluation.has_error() and "the server's stain reference is not JSON" in evaluation.error.reason

    stranger = app(later, context(store, tmp_path / "fresh-site"))  # a site without the backbone
    assert stranger.has_error() and "resends them next round" in stranger.error.reason


def test_end_to_end_finetuning_of_the_servers_architecture_needs_no_frozen_weights_and_reports_the_resolution(
    store, tmp_path
):
    import json

    from cmdfed.model.config import ModelConfig

    config = FederationConfig(
        classes="epithelial,lymphocyte,stromal",
        local_steps=1,
        batch_size=2,
        eval_tiles=2,
        augment=False,
        finetune_trainable="all",
    )
    # A model of the tiny preset with narrower heads, as a run started from such a checkpoint builds it.
    architecture = ModelConfig.from_preset("tiny", head_width=16, n_classes=4)
    torch.manual_seed(0)
    model = build_model(config.model_config("finetune", architecture))
    arrays, layout = packed(model.state_dict_for(config.sent_groups("finetune")))
    values = {
        "phase": "finetune",
        "phase-round": 1,
        "round": 1,
        **layout.to_values(LAYOUT_PREFIX),
        "architecture": json.dumps(architecture.to_dict()),
    }  # no frozen-sha: nothing is frozen
    train = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(values)}), dst_node_id=7, message_type=MessageType.TRAIN
    )
    node_config = {"store": str(store), "name": "site-a", "work-dir": str(tmp_path), "device": "cpu"}
    reply = app(
        train,
        Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config.to_run_config()),
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (vector,) = reply.content["arrays"].values()
    assert vector.shape == (layout.size,)  # the whole model, in the server's architecture
    assert reply.content["metrics"]["mpp"] == 0.5


def test_a_missing_store_gives_an_error_reply_naming_the_site_not_the_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(CONFIG.model_config("pretrain"))
    missing = tmp_path / "hospital-7" / "patients" / "site.zarr"
    reply = app(message(MessageType.TRAIN, "pretrain", model), context(missing, tmp_path, name="site-b"))
    assert reply.has_error()
    assert reply.error.reason.startswith("[site-b] CmdfedError:")
    assert "site.zarr" in reply.error.reason and "hospital-7" not in reply.error.reason


def test_the_client_app_loads_without_opacus_until_a_round_uses_dp():
    # Flower starts a fresh ClientApp process per message by default: Opacus (~1 s) only for DP rounds.
    code = "import sys, client.client_app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


DP_CONFIG = FederationConfig(
    classes="epithelial,lymphocyte,stromal",
    local_steps=1,
    batch_size=2,
    eval_tiles=2,
    augment=False,
    dp_mode="local",
    dp_noise_multiplier=1.0,
    dp_epsilon=50.0,
)
DP_KEYS = {"dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_max_grad_norm", "dp_budget_epsilon"}


def dp_context(store, work_dir, **node_config) -> Context:
    values = {"store": str(store), "name": "site-a", "work-dir": str(work_dir), "device": "cpu", **node_config}
    return Context(run_id=1, node_id=7, node_config=values, state=RecordDict(), run_config=DP_CONFIG.to_run_config())


def test_under_local_dp_a_site_sends_only_privacy_numbers_unless_its_admin_opts_in(store, tmp_path):
    torch.manual_seed(0)
    model = build_model(DP_CONFIG.model_config("pretrain"))
    train = message(MessageType.TRAIN, "pretrain", model, {"run-id": "run-1"})
    reply = app(train, dp_context(store, tmp_path))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # No loss, masked_mse; the store's resolution goes (the scanner's, not a statistic of the tiles).
    assert set(reply.content["metrics"]) == {"num-examples", "train_seconds", "mpp", *DP_KEYS}
    evaluation = app(message(MessageType.EVALUATE, "pretrain", model), dp_context(store, tmp_path))
    assert not evaluation.has_error() and "metrics" not in evaluation.content.metric_records  # not evaluated

    shared = app(train, dp_context(store, tmp_path, **{"share-metrics": True}))
    assert {"num-examples", "loss", "masked_mse", *DP_KEYS} <= set(shared.content["metrics"])
    evaluation = app(
        message(MessageType.EVALUATE, "pretrain", model), dp_context(store, tmp_path, **{"share-metrics": True})
    )
    assert "masked_mse" in evaluation.content["metrics"]
    wrong = app(train, dp_context(store, tmp_path, **{"share-metrics": "yes"}))
    assert wrong.has_error() and "share-metrics must be true or false" in wrong.error.reason


def test_local_dp_needs_a_lasting_work_dir_for_the_privacy_ledger(store, tmp_path):
    torch.manual_seed(0)
    model = build_model(DP_CONFIG.model_config("pretrain"))
    no_work_dir = Context(
        run_id=1,
        node_id=7,
        node_config={"store": str(store), "name": "site-a", "device": "cpu"},
        state=RecordDict(),
        run_config=DP_CONFIG.to_run_config(),
    )
    reply = app(message(MessageType.TRAIN, "pretrain", model, {"run-id": "run-1"}), no_work_dir)
    assert reply.has_error()
    assert "node config has no work-dir" in reply.error.reason and "cmdfed client start" in reply.error.reason
    assert "--work-dir DIR" in reply.error.reason
    # Without DP the temporary default stays (it holds only a cache).
    settings = SiteSettings.from_node_config({"store": str(store), "name": "site-a"})
    assert settings.work_dir.name == "cmdfed-site-site-a"
