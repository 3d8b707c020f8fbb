"""The federated run's settings (``FederationConfig``) and what each phase sends.

Flower hands the run config to the ServerApp and every ClientApp as a flat mapping of
hyphenated keys (``pretrain-rounds = 2``); ``from_run_config``/``to_run_config`` translate
between that and the validated dataclass, so both sides read one schema and the defaults
written into ``pyproject.toml`` come from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmdfed.errors import CmdfedError
from cmdfed.model.config import MODEL_PRESETS, ConfigBase, ModelConfig, require
from cmdfed.train.phases import finetune_model_config

PHASES = ("pretrain", "finetune")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
FINETUNE_TRAINABLE = ("heads", "heads+modulation", "all")
DP_MODES = ("off", "local", "central")


@dataclass(frozen=True)
class FederationConfig(ConfigBase):
    """One federated run: two phases of rounds, local training, aggregation, bookkeeping."""

    name: str = "cmdfed"  # the run's name in telemetry
    run_dir: str = "cmdfed-run"  # on the server: round checkpoints, run.json, received.jsonl
    telemetry: str = ""  # telemetry store path or URL; "" = RUN_DIR/telemetry.db
    # Initial global weights: "" = random (seeded), else a checkpoint or run folder on the server or a
    # released model's name (``cmdfed models list``); its architecture is the run's (see ``cmdfed.federation.init``).
    init: str = ""
    preset: str = "tiny"  # with init: must name the preset the checkpoint was built from
    classes: str = ""  # comma-separated nucleus types of the NC head ("" = no NC head)
    pretrain_rounds: int = 10
    finetune_rounds: int = 10
    local_steps: int = 50
    batch_size: int = 8
    pretrain_lr: float = 2e-4
    finetune_lr: float = 1e-3
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    augment: bool = True  # flips, 90-degree rotations and stain jitter (cmdfed.data.augment)
    # With augment, fine-tuning rounds can also zoom and blur as the default recipe does (0.2, 1.0). Off by
    # default: continuing a trained segmenter (the demo) with them scored PQ 0.05 lower after each round.
    finetune_scale_jitter: float = 0.0
    finetune_blur_sigma: float = 0.0
    label_fraction: float = 1.0
    finetune_trainable: str = "heads"  # heads | heads+modulation | all (end to end)
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedyogi
    proximal_mu: float = 0.01  # fedprox
    server_lr: float = 0.01  # fedadam/fedyogi: eta
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    fraction_sites: float = 1.0
    min_sites: int = 2
    round_timeout_s: float = 3600.0
    update_norm_limit: float = 10.0  # reject an update whose norm exceeds this x the others' median
    eval_every: int = 1  # federated evaluation every N rounds of a phase (0 = never)
    server_eval_every: int = 1  # central evaluation on server-eval-store every N rounds (0 = never); costs no messages
    eval_tiles: int = 32  # tiles each site (and the server) evaluates on
    server_eval_store: str = ""  # a labelled store on the server for central evaluation
    seed: int = 0
    keep_rounds: int = 0  # round checkpoints kept: the newest N >= 2 and the last pretraining round (0 = every round)
    # Differential privacy (cmdfed.privacy): off, local (DP-SGD at each site), central (the server
    # clips each site's update to dp-clip-norm and noises the average).
    dp_mode: str = "off"
    dp_epsilon: float = 8.0  # local: each site's budget for the whole run
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0  # local: per-tile gradient clipping norm
    dp_noise_multiplier: float = 0.0  # local: 0 = the least that keeps the planned run in budget; central: > 0
    dp_clip_norm: float = 1.0  # central: bound on each site's update norm

    def validate(self) -> None:
        require(self.name.strip() != "", "name must not be empty")
        require(self.run_dir.strip() != "", "run-dir must name a folder")
        require(self.preset in MODEL_PRESETS, f"preset must be one of {', '.join(MODEL_PRESETS)}, got {self.preset!r}")
        require(self.pretrain_rounds >= 0 and self.finetune_rounds >= 0, "round counts must be >= 0")
        require(self.pretrain_rounds + self.finetune_rounds > 0, "a run needs at least one round")
        for name in ("local_steps", "batch_size", "min_sites", "eval_tiles"):
            require(getattr(self, name) > 0, f"{_key(name)} must be positive, got {getattr(self, name)}")
        for name in ("pretrain_lr", "finetune_lr", "round_timeout_s", "update_norm_limit", "server_lr", "tau"):
            require(getattr(self, name) > 0, f"{_key(name)} must be positive, got {getattr(self, name)}")
        for name in (
            "weight_decay",
            "grad_clip",
            "proximal_mu",
            "eval_every",
            "server_eval_every",
            "finetune_scale_jitter",
            "finetune_blur_sigma",
        ):
            require(getattr(self, name) >= 0, f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        require(
            self.keep_rounds == 0 or self.keep_rounds >= 2,
            f"keep-rounds must be 0 (every round) or at least 2, got {self.keep_rounds}",
        )
        require(0 < self.label_fraction <= 1, f"label-fraction must be in (0, 1], got {self.label_fraction}")
        require(0 < self.fraction_sites <= 1, f"fraction-sites must be in (0, 1], got {self.fraction_sites}")
        require(0 <= self.beta_1 < 1 and 0 <= self.beta_2 < 1, "beta-1 and beta-2 must be in [0, 1)")
        require(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        require(
            self.finetune_trainable in FINETUNE_TRAINABLE,
            f"finetune-trainable must be one of {', '.join(FINETUNE_TRAINABLE)}, got {self.finetune_trainable!r}",
        )
        require(self.dp_mode in DP_MODES, f"dp-mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")
        for name in ("dp_epsilon", "dp_max_grad_norm", "dp_clip_norm"):
            require(getattr(self, name) > 0, f"{_key(name)} must be positive, got {getattr(self, name)}")
        require(0 < self.dp_delta < 1, f"dp-delta must be in (0, 1), got {self.dp_delta}")
        require(self.dp_noise_multiplier >= 0, f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}")
        # DP-SGD clips per-tile gradients from the layers; the proximal term's gradient would be dropped.
        require(
            not (self.dp_mode == "local" and self.strategy == "fedprox"),
            "dp-mode local cannot be combined with fedprox; use fedavg, fedadam or fedyogi",
        )
        # Flower's DP wrappers noise the average; after a FedOpt step the noise would be mis-scaled.
        require(
            not (self.dp_mode == "central" and self.strategy in ("fedadam", "fedyogi")),
            "dp-mode central works with fedavg or fedprox, whose result is the average it noises",
        )
        require(
            self.dp_mode != "central" or self.dp_noise_multiplier > 0,
            "dp-mode central needs dp-noise-multiplier > 0 (the noise the server adds, in units of dp-clip-norm)",
        )
        names = self.class_names[1:]
        require(
            len(set(names)) == len(names) and all(names),
            f"classes must be distinct non-empty names, got {self.classes!r}",
        )

    # -- Flower's run config -------------------------------------------------------------

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """From Flower's run config (hyphenated keys); unknown keys are an error."""
        return cls.from_dict({k.replace("-", "_"): v for k, v in run_config.items()})

    def to_run_config(self) -> dict[str, Any]:
        return {_key(k): v for k, v in self.to_dict().items()}

    # -- derived -------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names as site stores list them: background first."""
        given = [c.strip() for c in self.classes.split(",")] if self.classes.strip() else []
        return ["background", *given]

    def rounds(self, phase: str) -> int:
        return self.pretrain_rounds if phase == "pretrain" else self.finetune_rounds

    def global_round(self, phase: str, phase_round: int) -> int:
        """Rounds are numbered through the run: fine-tuning continues after pretraining."""
        return phase_round if phase == "pretrain" else self.pretrain_rounds + phase_round

    @property
    def n_classes(self) -> int:
        """NC channels of the run's model (0 = no NC head)."""
        return len(self.class_names) if len(self.class_names) > 1 else 0

    def architecture(self) -> ModelConfig:
        """The preset's architecture with the run's NC head: the run's model unless ``init`` gives one."""
        return ModelConfig.from_preset(self.preset, n_classes=self.n_classes)

    def model_config(self, phase: str, architecture: ModelConfig | None = None) -> ModelConfig:
        """The model both sides build in ``phase``: ``architecture`` (the init checkpoint's, which the
        server sends the sites with every round; None = the preset's) with the run's NC head;
        fine-tuning drops drop-path unless it trains end to end (frozen branches only add noise)."""
        base = architecture if architecture is not None else self.architecture()
        base = ModelConfig.from_dict({**base.to_dict(), "n_classes": self.n_classes})
        return base if phase == "pretrain" else finetune_model_config(base, self.n_classes, self.finetune_trainable)

    def sent_groups(self, phase: str) -> tuple[str, ...]:
        """Parameter groups a round trains and sends both ways."""
        if phase == "pretrain":
            return ("backbone", "modulation")
        return {
            "heads": ("heads",),
            "heads+modulation": ("heads", "modulation"),
            "all": ("backbone", "modulation", "heads"),
        }[self.finetune_trainable]

    def frozen_groups(self, phase: str) -> tuple[str, ...]:
        """Groups a fine-tuning site needs but never trains; delivered once per phase, not per round."""
        if phase == "pretrain":
            return ()
        return tuple(g for g in ("backbone", "modulation") if g not in self.sent_groups(phase))

    def lr(self, phase: str) -> float:
        return self.pretrain_lr if phase == "pretrain" else self.finetune_lr

    def resume_key(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (paths and timeouts may)."""
        movable = {
            "run_dir",
            "telemetry",
            "round_timeout_s",
            "server_eval_store",
            "server_eval_every",
            "min_sites",
            "fraction_sites",
            "keep_rounds",
        }
        return {k: v for k, v in self.to_dict().items() if k not in movable}


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise CmdfedError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
    return phase


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")
