"""Training on two ranks (gloo, CPU) through the real DistillTrainer equals training in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from ultralytics.utils.torch_utils import unwrap_model

from softlabel.train.sampler import EpochSampler
from softlabel.teacher import save_checkpoint_from_yaml
from softlabel.toydata import NAMES

IMGSZ = 64
RANK_SCRIPT = Path(__file__).with_name("ddp_rank.py")
TIMEOUT = 240  # seconds for one launch: a rank waiting on a collective the other never joins fails here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, name: str, world: int, spec: dict) -> list[dict]:
    """Start `world` ranks (or one plain process for world 0) as torch.distributed.run would, and
    return each rank's record; kill them all if they run past TIMEOUT."""
    out = tmp / name
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({**spec, "out": str(out)}))
    port = str(_free_port())
    procs = []
    for rank in range(max(world, 1)):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        # the ranks save and resume a student with the test's own BatchNorm class (ddp_rank.py): a file this test trusts
        env.update(OMP_NUM_THREADS="1", YOLO_OFFLINE="1", YOLO_VERBOSE="False", PYTHONPATH=str(RANK_SCRIPT.parents[1]),
                   SOFTLABEL_TRUST_CHECKPOINTS="1", ULTRALYTICS_SAFE_LOAD="0")
        if world:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(out / f"log{rank}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(out / "spec.json")], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"{name}: ranks still running after {TIMEOUT} s (a hang in a collective?)\n" + _tail(out))
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"{name}: rank(s) {failed} failed\n" + _tail(out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(max(world, 1))]


def _tail(out: Path) -> str:
    return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(out.glob("log*.txt")))


def _level_neutral_teacher(path: Path) -> Path:
    """A seeded random yolov8n teacher whose class logits vary from anchor to anchor on every level.

    With Ultralytics' initialisation a random network's features shrink to 1e-5 and less, so its
    logits equal the class biases, which it sets by stride: every image's most confident anchor is
    the first one. Each convolution scaled to unit output spread, and one class bias on all levels,
    put an image's best anchor on a level that depends on the image, so ranks choose levels differently.
    """
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval()
    x = torch.rand(4, 3, IMGSZ, IMGSZ)
    dfl = model.model[-1].dfl.conv
    with torch.no_grad():
        for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not dfl]:
            seen = {}
            hook = conv.register_forward_hook(lambda m, i, o: seen.__setitem__("std", o.std()))
            model(x)
            hook.remove()
            conv.weight /= seen["std"]
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(0.0)
    model.names = dict(enumerate(NAMES[:3]))
    torch.save({"model": model.half(), "ema": None, "epoch": -1, "train_args": {}}, path)
    return path


@pytest.fixture(scope="module")
def ddp_setup(tmp_path_factory, dataset):
    tmp = tmp_path_factory.mktemp("ddp")
    teacher = _level_neutral_teacher(tmp / "teacher.pt")
    cache = tmp / "cache.zarr"
    # floor 0: every image keeps the same number of anchors, so the box term is a mean over equal parts of each image
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", cache, "--imgsz", IMGSZ, "--batch", 4,
                "--views", 1, "--close-views", 1, "--quiet", "--features", "dense", "--head-floor", 0)
    assert r.exit_code == 0, r.output
    student = save_checkpoint_from_yaml("yolov8n.yaml", NAMES[:3], tmp / "student.pt")
    # YOLO26: reg_max 1 and an end-to-end head (one2many and one2one), taught from the same yolov8n cache
    student26 = save_checkpoint_from_yaml("yolo26n.yaml", NAMES[:3], tmp / "student26.pt")
    from softlabel.builtin import CONFIG_DIR

    default = yaml.safe_load((CONFIG_DIR / "distill" / "default.yaml").read_text())
    distances = yaml.safe_load((CONFIG_DIR / "distill" / "distances.yaml").read_text())
    # "even": every term a plain mean over equal parts of each image, so the mean of the two ranks'
    # values is the value on the whole batch (weighted terms normalise by each rank's own weights)
    even = {**default, "box": {**default["box"], "confidence_weighted": False},
            "feat": {**default["feat"], "confidence_weighted": False, "level_balance": "equal", "positions": "all"}}
    # "uneven": one position per image, so the two images of a rank choose at most two of the three
    # levels, and the ranks leave different adapters without a gradient
    uneven = {**default, "feat": {**default["feat"], "positions": 1}}
    # the built-in config for a pair whose box forms differ, made even the same way (its box floor off: a floor keeps
    # a different number of anchors in each rank's images); its class and box terms
    # teach both branches of the end-to-end student, so the one2one head's gradients cross DDP too
    even26 = {**distances, "cls": {**distances["cls"], "branch": "both"},
              "box": {**distances["box"], "confidence_weighted": False, "min_confidence": 0.0, "branch": "both"},
              "feat": {**distances["feat"], "confidence_weighted": False, "level_balance": "equal", "positions": "all"}}
    configs = {}
    for name, cfg in (("even", even), ("uneven", uneven), ("even26", even26)):
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    # Detection gains 0: Ultralytics normalises the detection loss by each rank's own target score sum,
    # clamped at 1, which at random init with two images per rank makes the DDP detection gradient
    # half of one process's. That is Ultralytics' DDP, not softlabel's; the distillation terms, the
    # adapters and the student's DDP gradients are what is compared here.
    args = dict(model=str(student), data=str(dataset), epochs=2, imgsz=IMGSZ, batch=4, workers=0, device="cpu",
                plots=False, project=str(tmp / "runs"), exist_ok=True, seed=0, nbs=4, close_mosaic=1, amp=False,
                optimizer="SGD", lr0=0.01, warmup_epochs=0, val=False, box=0.0, cls=0.0, dfl=0.0)
    return tmp, {"cache": str(cache), "args": args, "running_stats_bn": True}, configs, {"yolov8n": student, "yolo26n": student26}


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in params.values()])


def _assert_same_on_ranks(records: list[dict], when: str) -> None:
    for part in ("student", "adapters"):
        a, b = records[0][when][part], records[1][when][part]
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{part} at {when}: ranks differ in {differ[:5]}"


# Tolerances. One process and two ranks compute the same sums in another order (two half batches
# and a gloo all-reduce instead of one batch), in float32: measured differences are about 1e-7 of
# the parameter updates and below 1e-5 of the losses. A sync error is a factor of 2 (gradients
# summed, or not averaged over a rank that skipped a parameter) or a different direction, so
# 1e-3 of the update and 1e-4 of each loss item separate the two by orders of magnitude.
UPDATE_RTOL = 1e-3
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-7


def _assert_two_ranks_equal_one_process(one: dict, two: list[dict], epoch: int = 0) -> None:
    """Both ranks ran under DDP and stayed identical, and their epoch `epoch` equals one process's: the
    adapters start from the same parameters, each step's loss items averaged over the ranks equal one
    process's on the same global batch, and the student and the adapters moved alike."""
    assert [r["ddp"] for r in two] == [True, True] and not one["ddp"]
    # the adapters start identical on both ranks and equal to one process's (built from the seed, then broadcast)
    _assert_same_on_ranks(two, "start")
    assert one["start"]["adapters"] and torch.equal(_flat(two[0]["start"]["adapters"]), _flat(one["start"]["adapters"]))
    # after the steps, every student and adapter parameter is identical on both ranks
    _assert_same_on_ranks(two, "end")

    # the loss trajectory: each step's loss items, averaged over the ranks as DDP averages gradients,
    # equal one process's on the same global batch
    steps = [s for s in one["steps"] if s["epoch"][0] == epoch]
    assert len(steps) == len(two[0]["steps"]) == len(two[1]["steps"]) == 3
    for k, ref in enumerate(steps):
        for item, value in ref["loss"].items():
            ddp = sum(r["steps"][k]["loss"][item] for r in two) / 2
            assert abs(ddp - value) <= LOSS_RTOL * abs(value) + LOSS_ATOL, (k, item, ddp, value)
    assert all(steps[0]["loss"][k] > 0 for k in ("kd_cls", "kd_box", "kd_feat"))
    # and the parameters moved alike: the update of the two ranks equals one process's
    for part in ("student", "adapters"):
        start = _flat(one["start"][part])
        mine, theirs = _flat(two[0]["end"][part]) - start, _flat(one["epochs"][epoch][part]) - start
        assert theirs.norm() > 0
        assert (mine - theirs).norm() <= UPDATE_RTOL * theirs.norm(), (part, float((mine - theirs).norm() / theirs.norm()))


def _assert_same_as_saved(resumed: list[dict], saved: dict) -> None:
    """A resumed run starts from last.pt, which holds the EMA of the wrapper (student and projector) in float16."""
    for part in ("student", "adapters"):
        expected = {k: v.half().float() for k, v in saved[part].items()}
        for r in resumed:
            got = r["start"][part]
            assert got.keys() == expected.keys(), part
            differ = [k for k in got if not torch.equal(got[k], expected[k])]
            assert not differ, f"{part}: rank {r['rank']} resumed with other values in {differ[:5]}"


@pytest.mark.slow
def test_two_ranks_train_as_one_process_and_resume(ddp_setup):
    tmp, spec, configs, _ = ddp_setup
    spec = {**spec, "distill": str(configs["even"])}
    n = 12  # make_dataset's training images
    # every run stops at the end of its last epoch (after the in-loop validation and save): the final
    # validation of best.pt builds its model on a CUDA device on a DDP rank
    one = _launch(tmp, "one", 0, {**spec, "args": {**spec["args"], "name": "one"}, "stop_after": 1})[0]
    two = _launch(tmp, "two", 2, {**spec, "args": {**spec["args"], "name": "two"}, "stop_after": 0})
    last = Path(spec["args"]["project"]) / "two" / "weights" / "last.pt"
    resumed = _launch(tmp, "resumed", 2, {**spec, "args": {"resume": str(last), "data": spec["args"]["data"]}, "stop_after": 1})

    _assert_two_ranks_equal_one_process(one, two)
    _assert_same_on_ranks(resumed, "start")
    _assert_same_on_ranks(resumed, "end")
    assert [r["ddp"] for r in resumed] == [True, True]

    # the resumed ranks continued from what the two ranks saved: the trained adapters came back from
    # last.pt with the student (not rebuilt from the seed), the same on both ranks
    _assert_same_as_saved(resumed, two[0]["ema"])
    assert not torch.equal(_flat(resumed[0]["start"]["adapters"]), _flat(two[0]["start"]["adapters"]))
    # the resumed run continued at epoch 1 (a closing epoch) on both ranks, and trained its adapters on
    assert [r["start_epoch"] for r in resumed] == [1, 1]
    assert (_flat(resumed[0]["end"]["adapters"]) - _flat(resumed[0]["start"]["adapters"])).norm() > 0

    # each rank saw a distinct half; together, one process's global batches in its order
    for records, epoch in ((two, 0), (resumed, 1)):
        seen = [[i for s in r["steps"] for i in s["samples"]] for r in records]
        assert all(len(s) == n // 2 for s in seen) and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))
        assert all(e == epoch for r in records for s in r["steps"] for e in s["epoch"])
        reference = [sorted(s["samples"]) for s in one["steps"] if s["epoch"][0] == epoch]
        assert [sorted(a["samples"] + b["samples"]) for a, b in zip(*(r["steps"] for r in records))] == reference
        for r in records:
            assert seen[r["rank"]] == EpochSampler(n, seed=0, rank=r["rank"], world=2).order(epoch)[r["rank"] :: 2]

    # every sample a rank loaded had its replayed and cached fingerprints compared, and they matched
    for records, view in ((two, "v0"), (resumed, "c0")):
        for r in records:
            loaded = {f"{view}/{i}" for s in r["steps"] for i in s["samples"]}
            assert set(r["fingerprints"]) == loaded
            assert all(fp["replayed"] == fp["cached"] for fp in r["fingerprints"].values())


@pytest.mark.slow
def test_two_ranks_train_a_yolo26_student_as_one_process(ddp_setup):
    """An end-to-end student with reg_max 1 (YOLO26), taught by a yolov8n cache through the distances config:
    its two branches, its distance box term and its adapters train on two ranks as in one process."""
    tmp, spec, configs, students = ddp_setup
    args = {**spec["args"], "model": str(students["yolo26n"]), "epochs": 1, "close_mosaic": 0}
    spec = {**spec, "distill": str(configs["even26"])}
    one = _launch(tmp, "one26", 0, {**spec, "args": {**args, "name": "one26"}, "stop_after": 0})[0]
    two = _launch(tmp, "two26", 2, {**spec, "args": {**args, "name": "two26"}, "stop_after": 0})
    assert all(r["branches"] == ["one2many", "one2one"] and r["criterion"] == "E2ELoss" for r in [one, *two])
    _assert_two_ranks_equal_one_process(one, two)
    # the one2one head is taught (branch "both") and moved alike on both ranks
    o2o = [k for k in one["start"]["student"] if ".one2one_cv" in k]
    assert o2o
    moved = {k: two[0]["end"]["student"][k] - one["start"]["student"][k] for k in o2o}
    assert _flat(moved).norm() > 0


@pytest.mark.slow
def test_ranks_that_leave_different_adapters_without_gradient_stay_in_step(ddp_setup):
    """DDP reduces every adapter gradient some rank computed, onto every rank, whichever adapters each rank's
    batch used: nothing hangs, the replicas agree, and only an adapter no rank used is left without a gradient."""
    tmp, spec, configs, _ = ddp_setup
    spec = {**spec, "distill": str(configs["uneven"])}
    two = _launch(tmp, "uneven", 2, {**spec, "args": {**spec["args"], "name": "uneven", "epochs": 1, "close_mosaic": 0}, "stop_after": 0})
    assert [r["ddp"] for r in two] == [True, True]
    steps = list(zip(two[0]["steps"], two[1]["steps"]))
    assert len(steps) == 3
    # two images with one position each reach at most two of the three levels: every rank's backward
    # leaves some adapter without a gradient on every step
    assert all(s["local_no_grad"] for r in two for s in r["steps"])
    # on some step the ranks left different adapters without a gradient: a reduction that only
    # covered the gradients a rank had would issue other collectives than its peer there
    assert any(a["local_no_grad"] != b["local_no_grad"] for a, b in steps)
    # after the reduction both ranks hold a gradient for every adapter parameter either rank used;
    # only one that neither used keeps none
    for a, b in steps:
        assert a["no_grad"] == b["no_grad"] == sorted(set(a["local_no_grad"]) & set(b["local_no_grad"]))
    _assert_same_on_ranks(two, "start")
    _assert_same_on_ranks(two, "end")
    moved = _flat(two[0]["end"]["adapters"]) - _flat(two[0]["start"]["adapters"])
    assert moved.norm() > 0


# the sampler ---------------------------------------------------------------------------------


def test_sampler_has_ultralytics_distributed_semantics():
    """set_epoch (Ultralytics calls it on every rank), distinct equal shares, one order per epoch from the seed."""
    n, world = 10, 3
    samplers = [EpochSampler(n, seed=5, rank=r, world=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(4)  # a resumed run's first epoch
    parts = [list(s) for s in samplers]
    assert all(len(p) == 4 for p in parts) and all(e == 4 for p in parts for _, e in p)
    assert sorted({i for p in parts for i, _ in p}) == list(range(n))  # 12 slots: two indices repeat to pad
    full = samplers[0].order(4)  # the one order, whatever the world size, padded with its own start
    assert full[:n] == EpochSampler(n, seed=5).order(4) and full[n:] == full[: 12 - n]
    assert [i for i, _ in parts[1]] == full[1::world]
    assert EpochSampler(n, seed=5).order(4) != EpochSampler(n, seed=6).order(4)
    assert [i for i, _ in parts[0]] != [i for i, _ in EpochSampler(n, seed=5, rank=0, world=world)]  # epoch 0 differs


def test_sampler_pass_started_ahead_keeps_its_epoch():
    """A worker may start the next pass before the trainer calls set_epoch for it: the pass already says its epoch."""
    s = EpochSampler(6, seed=0)
    s.set_epoch(0)
    assert {e for _, e in s} == {0}
    ahead = iter(s)
    first = next(ahead)  # prefetched: epoch 1 begins before set_epoch(1)
    s.set_epoch(1)
    assert first[1] == 1 and {e for _, e in ahead} == {1}
    s.set_epoch(2)
    assert {e for _, e in s} == {2}
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(6, seed=0, rank=2, world=2)


# the adapters in Ultralytics' optimizer -----------------------------------------------------------


@pytest.fixture(scope="module", params=[("SGD", 0.01), ("AdamW", 0.001), ("MuSGD", 0.01)], ids=["SGD", "AdamW", "MuSGD"])
def set_up_trainer(request, ddp_setup):
    """A single-process trainer after Ultralytics' own setup: the student wrapped with its terms, the optimizer
    built over the wrapper as a run builds it. A weight decay other than the default, and a nominal batch
    twice the batch, so that the run's decay (scaled by batch * accumulate / nbs) is its own."""
    from softlabel.train import make_trainer

    tmp, spec, _, _ = ddp_setup
    name, lr0 = request.param
    args = {**spec["args"], "optimizer": name, "lr0": lr0, "weight_decay": 0.003, "nbs": 8, "name": f"optim-{name}"}
    trainer = make_trainer(cache=spec["cache"])(overrides=args)
    trainer._setup_train()
    return trainer


def test_adapters_are_in_ultralytics_own_param_groups(set_up_trainer):
    """The optimizer covers the projector through Ultralytics' grouping of the whole wrapped model: every
    trainable projector parameter in exactly one group, its weights in the group of the student's
    convolution weights (the run's weight decay), its biases in that of the student's biases (no decay),
    at the base learning rate, and no group of ours beside Ultralytics' own."""
    from softlabel.distill.model import DistillModel

    trainer = set_up_trainer
    optimizer, model = trainer.optimizer, unwrap_model(trainer.model)
    assert isinstance(model, DistillModel) and trainer.distiller is model.projector
    name, lr0 = trainer.args.optimizer, trainer.args.lr0
    decay = trainer.args.weight_decay * trainer.batch_size * trainer.accumulate / trainer.args.nbs
    assert decay == pytest.approx(0.003) and trainer.accumulate == 2
    assert type(optimizer).__name__ == name
    groups = optimizer.param_groups
    # Ultralytics' weight, bn and bias groups (MuSGD: muon, weight, bn, bias, each split off at 3x lr for the head)
    kinds = ["weight", "bn", "bias"] + (["muon"] if name == "MuSGD" else [])
    assert sorted(g["param_group"] for g in groups) == sorted(kinds * (2 if name == "MuSGD" else 1))

    where: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        for p in g["params"]:
            where.setdefault(id(p), []).append(i)
    # every trainable parameter of the wrapper, the projector's among them, is in exactly one group
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n: len(where.get(id(p), [])) for n, p in trainable.items()} == dict.fromkeys(trainable, 1)
    assert set(where) == {id(p) for p in model.parameters()}  # and nothing else (Ultralytics groups its frozen DFL too)

    mine = dict(trainer.distiller.named_parameters())
    assert any(n.startswith("terms.feat.adapters.") for n in mine) and all(p.requires_grad for p in mine.values())
    student = dict(model.student_model.named_parameters())
    weights, biases = where[id(student["model.22.cv2.0.2.weight"])], where[id(student["model.22.cv2.0.2.bias"])]
    assert {n: where[id(p)] for n, p in mine.items()} == {n: biases if n.endswith(".bias") else weights for n in mine}
    w, b = groups[weights[0]], groups[biases[0]]
    assert w["param_group"] == ("muon" if name == "MuSGD" else "weight") and w["weight_decay"] == pytest.approx(decay)
    assert b["param_group"] == "bias" and b["weight_decay"] == 0.0
    assert w["lr"] == b["lr"] == pytest.approx(lr0)  # not MuSGD's 3x groups of the head's class branch


def test_an_epoch_run_again_is_replayed_from_its_start():
    """NaN recovery and an out-of-memory retry run an epoch again; its batches must say that epoch again."""
    from types import SimpleNamespace

    from softlabel.train import _replay_an_epoch_begun_again

    sampler = EpochSampler(4, seed=0)
    resets = []
    trainer = SimpleNamespace(epoch=0, epoch_sampler=sampler, train_loader=SimpleNamespace(reset=lambda: resets.append(1)))
    _replay_an_epoch_begun_again(trainer)
    assert {e for _, e in sampler} == {0} and not resets
    trainer.epoch = 1
    _replay_an_epoch_begun_again(trainer)
    assert {e for _, e in sampler} == {1} and not resets
    _replay_an_epoch_begun_again(trainer)  # epoch 1 again
    assert resets == [1] and {e for _, e in sampler} == {1}
