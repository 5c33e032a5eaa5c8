"""One rank of a CPU training run through the real DistillTrainer, started by tests/test_ddp.py.

Run as `python tests/ddp_rank.py SPEC.json` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set as torch.distributed.run sets them (none of them for a single process). The rank
builds its trainer as Ultralytics' generated DDP script does, trains, and writes what it saw to
<out>/rank<R>.pt: the samples of every batch, the replayed and cached fingerprint of every sample
it loaded, the loss items of every step, and its adapters and student parameters at the start
and at the end (and, at the end, its EMA's, which last.pt holds and a resumed run starts from).

The distillation terms live inside the trained module (a DistillModel: the student at
`student_model`, the terms at `projector`), so DDP wraps them with the student; "adapters" below are
every parameter of the projector and "student" every parameter of the student alone.

Only the CUDA device setup is replaced: Ultralytics' `_setup_ddp` picks a CUDA device and NCCL,
and it passes that device's index to DistributedDataParallel as device_ids, which a CPU module
must not have. Everything else (the training loop, DDP wrapping, sampler, optimizer, resume) is
the trainer's own.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultralytics.utils import RANK  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from softlabel.train import make_trainer  # noqa: E402


class CpuDDP(DistributedDataParallel):
    """DistributedDataParallel as Ultralytics builds it, minus the CUDA device_ids ([None] on a CPU device)."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, device_ids=None if device_ids == [None] else device_ids, **kwargs)


torch.nn.parallel.DistributedDataParallel = CpuDDP


class RunningStatsBatchNorm(nn.BatchNorm2d):
    """BatchNorm that normalises with its running statistics in training too (they stay as loaded).

    Ultralytics' DDP keeps plain BatchNorm, so each rank normalises with its own half of the batch;
    on a tiny random-init model that alone makes one process's gradient and the ranks' averaged
    gradient unrelated (cosine near 0). A student with this normalisation computes the same function
    whatever the batch split, so the two runs can be compared step by step.
    """

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def student_with_running_stats(path: str) -> nn.Module:
    from ultralytics.nn.tasks import load_checkpoint

    model = load_checkpoint(path, device="cpu")[0].float()
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = RunningStatsBatchNorm  # same parameters and buffers, same state-dict keys
    return model


class Stop(Exception):
    pass


class _Recorder:
    """Passes calls through to the replay or the cache reader and notes each sample's fingerprint."""

    def __init__(self, inner, log: dict, key: str):
        self.inner, self.log, self.key = inner, log, key

    def __call__(self, i, view):
        s = self.inner(i, view)
        self.log.setdefault((view.key, int(i)), {})[self.key] = bytes(s.fingerprint)
        return s

    def read(self, view_key, i, **kwargs):
        cached = self.inner.read(view_key, i, **kwargs)
        self.log.setdefault((view_key, int(i)), {})[self.key] = bytes(cached.fingerprint)
        return cached

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.named_parameters()}


def _parts(wrapper) -> dict[str, dict[str, torch.Tensor]]:
    """The projector's parameters and the student's, of the trained DistillModel or its EMA copy."""
    return {"adapters": _params(wrapper.projector), "student": _params(wrapper.student_model)}


def main(spec: dict) -> None:
    out = Path(spec["out"])
    record: dict = {"rank": RANK, "steps": [], "fingerprints": {}}
    Base = make_trainer(cache=spec["cache"], distill_config=spec["distill"])

    class CpuRanks(Base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if RANK != -1:  # the world size a device list such as "0,1" gives; "cpu" gives 0
                self.world_size = int(os.environ["WORLD_SIZE"])

        def _setup_ddp(self):
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", rank=RANK, world_size=self.world_size, timeout=timedelta(seconds=90))

        def build_dataset(self, img_path, mode="train", batch=None):
            dataset = super().build_dataset(img_path, mode, batch)
            if mode == "train":
                dataset.replay = _Recorder(dataset.replay, record["fingerprints"], "replayed")
                dataset.reader = _Recorder(dataset.reader, record["fingerprints"], "cached")
            return dataset

        def optimizer_step(self):
            # after DDP's reduction: the projector parameters without a gradient. With find_unused_parameters
            # a parameter some rank used gets the averaged gradient on every rank; only one that no rank
            # used keeps None. What this rank's own backward reached is recorded by the hooks in on_start.
            step = record["steps"][-1]
            step["no_grad"] = sorted(n for n, p in self.distiller.named_parameters() if p.grad is None)
            step["local_no_grad"] = sorted(n for n, _ in self.distiller.named_parameters() if n not in step["local"])
            del step["local"]
            super().optimizer_step()

        def preprocess_batch(self, batch):
            record["steps"].append({"epoch": batch["epoch"].tolist(), "samples": batch["sample"].tolist(), "local": set()})
            return super().preprocess_batch(batch)

    def on_start(trainer):
        # after DDP has wrapped the DistillModel (and broadcast rank 0's parameters) and resume has run
        model = unwrap_model(trainer.model)
        assert trainer.distiller is model.projector
        record["start"] = _parts(model)
        record["start_epoch"] = trainer.start_epoch
        record["ddp"] = isinstance(trainer.model, DistributedDataParallel)
        record["branches"] = list(trainer.distiller.student.branches)  # the student's head as the terms read it
        for name, p in trainer.distiller.named_parameters():
            # fires when this rank's backward computes the parameter's gradient, before DDP reduces it;
            # a parameter this rank's loss did not reach never fires
            p.register_hook(lambda grad, name=name: record["steps"][-1]["local"].add(name))

    def on_epoch_end(trainer):
        record.setdefault("epochs", {})[trainer.epoch] = _parts(unwrap_model(trainer.model))

    def on_batch_end(trainer):
        record["steps"][-1]["loss"] = {k: float(v) for k, v in trainer.loss_items.items()}

    def finish(trainer):
        record["end"] = _parts(unwrap_model(trainer.model))
        record["ema"] = _parts(trainer.ema.ema)
        record["criterion"] = type(unwrap_model(trainer.model).criterion).__name__  # the student's own detection loss
        record["epoch"] = trainer.epoch

    def maybe_stop(trainer):
        if spec.get("stop_after") is not None and trainer.epoch == spec["stop_after"]:
            finish(trainer)
            raise Stop

    args = dict(spec["args"])
    trainer = CpuRanks(overrides=args)
    if spec.get("running_stats_bn") and not args.get("resume"):  # a resumed run rebuilds its student from last.pt
        trainer.model = student_with_running_stats(args["model"])  # as Ultralytics' DDP script hands its ranks a model
    trainer.add_callback("on_pretrain_routine_end", on_start)
    trainer.add_callback("on_train_batch_end", on_batch_end)
    trainer.add_callback("on_train_epoch_end", on_epoch_end)
    trainer.add_callback("on_fit_epoch_end", maybe_stop)
    try:
        trainer.train()
        finish(trainer)
    except Stop:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    record["fingerprints"] = {f"{k[0]}/{k[1]}": v for k, v in record["fingerprints"].items()}
    torch.save(record, out / f"rank{max(RANK, 0)}.pt")


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
