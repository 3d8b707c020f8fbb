"""Federated CMD training, the plain-Python half: no Flower in here.

Hospitals train one model without moving a pixel, in two phases of rounds:

1. **pretrain**: masked-diffusion pretraining; the backbone and the adaLN modulation travel.
2. **finetune**: the backbone frozen, only the task heads (and optionally the modulation)
   are trained and travel; the frozen part reaches each site once per phase. Or end to end
   (``finetune-trainable = "all"``): nothing frozen, the whole model travels every round.

A run starts from seeded random weights or from a checkpoint (``init``: a released model
or a trained run); ``pretrain-rounds = 0`` then fine-tunes it directly.

Flower (``server/server_app.py``, ``client/client_app.py``) only moves messages and runs
the aggregation strategy; what a site does in a round and what the server decides and
keeps live here, so they are tested without processes:

* ``config``: ``FederationConfig``, the run's settings (Flower's run config), and which
  parameter groups each phase sends or freezes.
* ``local``: a site's local training and evaluation round.
* ``init``: the initial global weights and architecture from a checkpoint, and their record.
* ``updates``: screening of received updates (keys, shapes, finiteness, norm outliers)
  and redaction of paths from anything a site says.
* ``checkpoints``: ``RUN_DIR/round-NNNN`` written atomically; the last complete round.
* ``coordinator``: the server's bookkeeping: resume point, weights that travel,
  screening, checkpoints, telemetry, the audit of received messages, progress events.
"""
