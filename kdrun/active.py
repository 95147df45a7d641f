"""Active learning: a loop around training. Label `initial` training images; then, each round, train the run's
method on the labeled images alone, score the unlabeled pool with a heuristic and label the `query` highest-scoring
images (`kdrun active=margin active.initial=20 active.query=20 active.rounds=15`).

The pool is the run's training set: the dataset's training images less the validation images (`dataset.val_size`);
the test set only reports. Round k trains in `rounds/<k>/` (checkpoints, metrics.jsonl, summary.json, and
`labeled.json`: the positions in the run's training set labeled for its training and the ones newly queried), from
scratch by default (`active.warm_start=true`: from round k-1's weights). A method that needs a teacher which kdrun
trains gets one per round, trained on the labeled images only (`rounds/<k>/teacher.pt`). The run dir gets
`active_curve.csv` (round, labels, test_acc, val_acc), `active_curve.png`, a row per round in metrics.jsonl (and
W&B) and summary.json (the last round's, plus `active/*`).

Resuming: a round with a summary.json is not trained again, a round without one continues from its last.pt, and the
labeled images of a round are read back from its labeled.json; scoring is seeded per round, so a loop stopped
anywhere and rerun with the same command and `hydra.run.dir` labels the same images as one never stopped.

Scores are pure functions of probabilities; higher means "label first".
"""

import contextlib
import copy
import csv
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from kdrun import checkpoint, engine, models, rundir
from kdrun import data as kdata
from kdrun.data import Selection
from kdrun.data.loaders import BatchAugment, FolderLoader, Normalize
from kdrun.data.semi import labels_of, part
from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger, plain_config

log = logging.getLogger(__name__)


# ---- scores: probabilities in, one number per image out (higher: label first) -----------------------------
def entropy(p: torch.Tensor) -> torch.Tensor:
    """Predictive entropy -sum_c p_c log p_c of probabilities (..., N, C), in nats."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def margin(p: torch.Tensor) -> torch.Tensor:
    """Margin sampling: minus the gap between the two most probable classes of (N, C) probabilities."""
    top = p.topk(2, dim=-1).values
    return top[..., 1] - top[..., 0]


def least_confidence(p: torch.Tensor) -> torch.Tensor:
    """1 - the top-class probability of (N, C) probabilities."""
    return 1 - p.max(-1).values


def bald(p: torch.Tensor) -> torch.Tensor:
    """BALD (Houlsby et al. 2011; Gal et al. 2017 with MC dropout): the mutual information between the label and
    the weights, from T stochastic passes (T, N, C): the entropy of the mean minus the mean of the entropies."""
    return entropy(p.mean(0)) - entropy(p).mean(0)


def ensemble(p: torch.Tensor) -> torch.Tensor:
    """Beluch et al. (CVPR'18): the entropy of the ensemble's averaged softmax, from M members (M, N, C)."""
    return entropy(p.mean(0))


def consistency(p: torch.Tensor) -> torch.Tensor:
    """Disagreement under augmentation: the variance of the softmax across A augmented copies (A, N, C), per class
    (population variance), summed over the classes."""
    return p.var(0, unbiased=False).sum(-1)


SCORES = {"entropy": lambda p: entropy(p[0]), "margin": lambda p: margin(p[0]),
          "least_confidence": lambda p: least_confidence(p[0]), "bald": bald, "ensemble": ensemble,
          "consistency": consistency}
HEURISTICS = ("random", *SCORES)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k highest scores, highest first (ties: the lower position first)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def keep_confident(p: torch.Tensor, fraction: float) -> torch.Tensor:
    """Karamcheti et al. (ACL'21), leaving out the outliers: the positions of the images kept when the least
    confident `fraction` (the top-class probability of the mean prediction over the passes, (S, N, C)) is left out.
    Their dataset maps rank by the gold label's confidence over training epochs, which needs the pool's labels;
    this is its label-free counterpart, the same for every heuristic."""
    confidence = p.mean(0).max(-1).values
    drop = int(fraction * len(confidence))
    return torch.sort(torch.sort(confidence, descending=True, stable=True).indices[:len(confidence) - drop]).values


def initial(labels: torch.Tensor, n: int, how: str, seed: int) -> torch.Tensor:
    """Round 0's labeled positions (sorted): `random`, n drawn from all; `stratified`, as even over the classes as n
    allows (round robin over the classes in a drawn order, each class's images in a drawn order)."""
    g = torch.Generator().manual_seed(seed)
    if how == "random":
        return torch.randperm(len(labels), generator=g)[:n].sort().values
    classes = torch.unique(labels)
    classes = classes[torch.randperm(len(classes), generator=g)]
    members = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    members = [m[torch.randperm(len(m), generator=g)] for m in members]
    picks, depth = [], 0
    while len(picks) < n:
        picks += [m[depth] for m in members if depth < len(m)][:n - len(picks)]
        depth += 1
    return torch.stack(picks).sort().values


# ---- the loop --------------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: Path, method_name: str | None, device: torch.device) -> dict:
    """The active-learning loop of `cfg` (with `cfg.active`) in `run_dir`; returns the summary it writes."""
    a = cfg.active
    data = kdata.build(cfg.dataset)
    check(cfg, data)
    split = data.split_record()
    if split is not None:
        (run_dir / "split.json").write_text(json.dumps(split) + "\n")
    logger = RunLogger(run_dir, cfg.logger, plain_config(cfg), job_type="active")
    logger.rewind(-1)  # the rows of finished rounds are logged again, from their summaries
    labels = labels_of(data.splits.train)
    members = a.ensemble_size if a.heuristic == "ensemble" else 1
    rows, labeled, score_s, wall_s = [], None, 0.0, 0.0
    try:
        for k in range(a.rounds + 1):
            record = _round_dir(run_dir, k) / "labeled.json"
            if record.is_file():
                labeled = torch.tensor(json.loads(record.read_text())["labeled"])
            else:
                t0 = time.perf_counter()
                new = (initial(labels, a.initial, a.init, cfg.seed) if k == 0
                       else query(cfg, data, run_dir, k - 1, labeled, device, members))
                score_s += time.perf_counter() - t0
                labeled = torch.cat([labeled, new]).sort().values if k else new
                _write(record, json.dumps({"round": k, "labels": len(labeled), "labeled": labeled.tolist(),
                                           "queried": new.tolist(), "source_index": _source_index(data, labeled)}))
            last_round = k == a.rounds
            summaries = [train_round(cfg, data, run_dir, k, m, labeled, device, method_name)
                         for m in range(1 if last_round else members)]  # the last round queries nothing
            s = summaries[0]
            wall_s += sum(x["wall_s"] for x in summaries)
            rows.append({"round": k, "labels": len(labeled), "test_acc": s["test/acc"], "val_acc": s.get("val/acc")})
            logger.log({f"active/{key}": v for key, v in rows[-1].items() if v is not None}, k)
            log.info("active: round %d/%d: %d labels, test acc %.4f%s", k, a.rounds, len(labeled), s["test/acc"],
                     f", val acc {s['val/acc']:.4f}" if s.get("val/acc") is not None else "")
        summary = {**s, "active/heuristic": a.heuristic, "active/labels": [r["labels"] for r in rows],
                   "active/test_acc": [r["test_acc"] for r in rows], "active/val_acc": [r["val_acc"] for r in rows],
                   "active/score_s": round(score_s, 3), "wall_s": round(wall_s + score_s, 3)}
        write_curve(run_dir, rows, a.heuristic, logger)
        logger.summary(summary)
    finally:
        logger.close()
    return summary


def check(cfg: DictConfig, data: kdata.Data) -> None:
    """One sentence for a setting the loop cannot run, before anything trains."""
    a = cfg.active
    pool = len(data.splits.train)
    if cfg.get("scenario"):
        raise KdrunError("active= and scenario= each choose the training data of every stage; use one of them")
    if cfg.dataset.get("labeled_per_class") is not None or cfg.dataset.get("labeled_fraction") is not None:
        raise KdrunError("active= chooses which training images are labeled; unset dataset.labeled_per_class and "
                         "dataset.labeled_fraction")
    if int(cfg.trainer.get("devices", 1)) > 1:
        raise KdrunError(f"trainer.devices={cfg.trainer.devices}: the active-learning loop runs in one process; use "
                         "trainer.devices=1")
    method = get_class(cfg.method._target_)
    if cfg.get("teachers") and method.needs_teacher:
        raise KdrunError("active= trains a single teacher per round on the labeled images; an ensemble (teachers=) "
                         "is not supported, use teacher=NAME or teacher.checkpoint=PATH")
    need = a.initial + a.query * a.rounds
    if need > pool:
        raise KdrunError(f"active.initial={a.initial}, active.query={a.query} and active.rounds={a.rounds} label "
                         f"{need} images, but the pool holds {pool} ({data.name}'s training images less the validation "
                         "images); label fewer or run fewer rounds")
    smallest = pool - a.initial - a.query * (a.rounds - 1)  # the pool of the last query
    if a.pool_size is not None:
        smallest = min(smallest, a.pool_size)
    if a.rounds and smallest - int(a.drop_hardest * smallest) < a.query:
        raise KdrunError(f"active.pool_size={a.pool_size} with active.drop_hardest={a.drop_hardest} leaves fewer than "
                         f"active.query={a.query} images to choose from; score a bigger pool or leave out less")
    if a.heuristic == "bald":
        student = models.build(cfg.student, data)
        if not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in student.modules()):
            raise KdrunError(f"active=bald draws its stochastic passes with dropout, and the student "
                             f"{cfg.student.name} has no dropout layer with p > 0; set student.drop_rate=0.25 (or use a "
                             "model with dropout)")
    if a.heuristic == "consistency" and not isinstance(data.splits.train, InMemory):
        raise KdrunError(f"active=consistency augments images held in memory, and {data.name} is read from files; "
                         "choose another heuristic")


def _round_dir(run_dir: Path, k: int, member: int = 0) -> Path:
    """Round k's run dir; an ensemble's other members train in rounds/<k>/members/<m>/."""
    base = Path(run_dir) / "rounds" / str(k)
    return base if member == 0 else base / "members" / str(member)


def round_config(cfg: DictConfig, n_labeled: int, member: int = 0) -> tuple[DictConfig, int]:
    """The config a round trains with (the batch capped at the labeled count, evaluated after its last epoch, the
    seed of the ensemble member) and how many times an epoch repeats the labeled images: enough for `active.steps`
    steps over `schedule.epochs` epochs (1 with `active.steps=null`)."""
    rcfg = copy.deepcopy(cfg)
    with open_dict(rcfg):
        batch = min(int(cfg.schedule.batch_size), n_labeled)
        rcfg.schedule.batch_size = batch
        rcfg.trainer.eval_every = rcfg.schedule.epochs
        rcfg.seed = cfg.seed + member
    steps = cfg.active.steps
    return rcfg, 1 if steps is None else math.ceil(math.ceil(steps / cfg.schedule.epochs) * batch / n_labeled)


def train_round(cfg: DictConfig, data: kdata.Data, run_dir: Path, k: int, member: int, labeled: torch.Tensor,
                device: torch.device, method_name: str | None) -> dict:
    """Train round k (of ensemble member `member`) on the `labeled` positions; its summary (read back when the
    round finished before)."""
    from kdrun import run as krun
    from kdrun import teacher as kteacher

    rdir = _round_dir(run_dir, k, member)
    done = rdir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    rcfg, repeat = round_config(cfg, len(labeled), member)
    drawn = labeled.repeat(repeat)  # an epoch's images: the labeled ones, `repeat` times each
    rundir.check_same_run(rcfg, rdir)
    meta = {"arch": models.arch(rcfg.student, data), "config": rundir.identity(rcfg)}
    method_cls = get_class(cfg.method._target_)
    start = time.perf_counter()
    with _quiet():
        if method_cls.needs_teacher and not cfg.teacher.get("checkpoint") and cfg.teacher.epochs != 0:
            teacher_path = rdir / "teacher.pt"  # kdrun trains it: on the round's labeled images, not on the pool's
            if not teacher_path.is_file():
                tdata = replace(data, splits=replace(data.splits, train=part(data.splits.train, drawn)))
                teacher, s = kteacher.train_teacher(rcfg, tdata, device, rdir / "teacher", [])
                checkpoint.save({"model": teacher.state_dict(), "arch": models.arch(rcfg.teacher, tdata),
                                 "test_acc": s["test/acc"]}, teacher_path)
            with open_dict(rcfg):
                rcfg.teacher.checkpoint = str(teacher_path)
        job = krun.compose(rcfg, device)
        stages = []
        for stage in job.method.stages(rcfg.schedule.epochs):
            if stage.data is not None:
                raise KdrunError(f"the method's stage '{stage.name}' chooses its own training data, which active= "
                                 "chooses per round; run this method without active=")
            stages.append(replace(stage, data=Selection(indices=tuple(drawn.tolist()))))
        last = rdir / "checkpoints" / "last.pt"
        if cfg.active.warm_start and k and not last.is_file():
            checkpoint.load_weights(job.method.eval_model(), _round_dir(run_dir, k - 1, member) / "checkpoints" / "last.pt")
        log.info("active: round %d%s: training on %d labeled images, %d epochs of %d steps%s", k,
                 f" (ensemble member {member})" if member else "", len(labeled), rcfg.schedule.epochs,
                 len(drawn) // rcfg.schedule.batch_size, f"; continuing {last}" if last.is_file() else "")
        logger = RunLogger(rdir)
        try:
            summary = engine.train(job.method, job.loaders, rcfg.schedule, rcfg.trainer, run_dir=rdir, logger=logger,
                                   device=device, checkpoint_meta=meta, desc=f"round {k}", stages=stages,
                                   resume=last if last.is_file() else None)
            summary.pop("stage_results")
            summary = {**krun.report(rcfg, job, summary, method_name),
                       "wall_s": round(summary["wall_s"] + time.perf_counter() - start, 3)}
            logger.summary(summary)
        finally:
            logger.close()
    return summary


@contextlib.contextmanager
def _quiet():
    """A round's epoch lines stay in its metrics.jsonl, off the console (which gets a line per round)."""
    loggers = [logging.getLogger(n) for n in ("kdrun.engine", "kdrun.teacher", "kdrun.cache")]
    levels = [x.level for x in loggers]
    for x in loggers:
        x.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for x, level in zip(loggers, levels):
            x.setLevel(level)


def query(cfg: DictConfig, data: kdata.Data, run_dir: Path, k: int, labeled: torch.Tensor, device: torch.device,
          members: int = 1) -> torch.Tensor:
    """After round k: the `active.query` pool positions to label next, highest score first, from round k's
    model(s); seeded by (seed, k), so a rerun chooses the same."""
    a = cfg.active
    seed = cfg.seed * 1_000_003 + k
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(len(data.splits.train), dtype=torch.bool)
    mask[labeled] = False
    pool = torch.nonzero(mask).squeeze(1)
    if a.pool_size is not None and a.pool_size < len(pool):
        pool = pool[torch.randperm(len(pool), generator=g)[:a.pool_size]].sort().values
    probs = None
    if a.heuristic != "random" or a.drop_hardest:
        nets = [_trained(cfg, data, run_dir, k, m, device) for m in range(members)]
        torch.manual_seed(seed)  # MC dropout's masks
        probs = probabilities(a.heuristic, nets, data, pool, device, cfg.trainer.eval_batch_size,
                              a.mc_samples, a.augmentations, g)
    keep = keep_confident(probs, a.drop_hardest) if a.drop_hardest else torch.arange(len(pool))
    scores = torch.rand(len(pool), generator=g) if a.heuristic == "random" else SCORES[a.heuristic](probs)
    return pool[keep[top_k(scores[keep], a.query)]]


def _trained(cfg: DictConfig, data: kdata.Data, run_dir: Path, k: int, member: int, device) -> torch.nn.Module:
    """Round k's trained student (its last.pt), in eval mode."""
    net = models.build(cfg.student, data)
    checkpoint.load_weights(net, _round_dir(run_dir, k, member) / "checkpoints" / "last.pt", what="student")
    return net.to(device).eval()


@torch.no_grad()
def probabilities(heuristic: str, nets: list[torch.nn.Module], data: kdata.Data, pool: torch.Tensor, device,
                  batch_size: int, mc_samples: int, augmentations: int, generator: torch.Generator) -> torch.Tensor:
    """The softmax of the pool images (S, N, C), batched, in eval mode: S = 1 pass of the model; bald: mc_samples
    passes with the dropout layers on; ensemble: one pass per network; consistency: `augmentations` augmented
    copies (the dataset's crop and flip, or a 2-pixel shift when it has none)."""
    net = nets[0]
    if heuristic == "bald":
        for m in net.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.train()
    normalize = Normalize(data.mean, data.std, device)
    augment = kdata.train_augment(data) or BatchAugment(crop_padding=2)
    train = data.splits.train
    if isinstance(train, InMemory):
        batches = (train.images[i].to(device) for i in pool.split(batch_size))
    else:
        test_tf = kdata.folder_transforms(data)[1]
        batches = (b["image"] for b in FolderLoader(train, test_tf, batch_size, Normalize([0.0], [1.0], device),
                                                    device, positions=pool))
    out = []
    for x in batches:
        if heuristic == "consistency":
            views = [normalize(augment(x, generator)) for _ in range(augmentations)]
            p = [net(v).softmax(-1) for v in views]
        else:
            x = normalize(x)
            p = ([n(x).softmax(-1) for n in nets] if heuristic == "ensemble"
                 else [net(x).softmax(-1) for _ in range(mc_samples if heuristic == "bald" else 1)])
        out.append(torch.stack(p).float().cpu())
    net.eval()
    return torch.cat(out, 1)


def _source_index(data: kdata.Data, labeled: torch.Tensor) -> list[int]:
    """The positions of `labeled` (positions in the run's training set) in the dataset's own training set."""
    if data.val_index is None:
        return labeled.tolist()
    n = len(data.splits.train) + len(data.val_index)
    mask = torch.ones(n, dtype=torch.bool)
    mask[data.val_index] = False
    return torch.nonzero(mask).squeeze(1)[labeled].tolist()


def _write(path: Path, text: str) -> None:
    """Write a file whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def write_curve(run_dir: Path, rows: list[dict], heuristic: str, logger: RunLogger) -> None:
    """active_curve.csv (round, labels, test_acc, val_acc) and, where matplotlib is installed, active_curve.png."""
    with open(run_dir / ".active_curve.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "labels", "test_acc", "val_acc"])
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / ".active_curve.csv.tmp").replace(run_dir / "active_curve.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("active_curve.png needs matplotlib: pip install 'kdrun[plot]'")
        return
    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    labels = [r["labels"] for r in rows]
    ax.plot(labels, [r["test_acc"] for r in rows], "o-", label="test")
    if rows[0]["val_acc"] is not None:
        ax.plot(labels, [r["val_acc"] for r in rows], "s--", alpha=0.6, label="validation")
    ax.set(xlabel="labeled images", ylabel="accuracy", title=f"active learning: {heuristic}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(run_dir / "active_curve.png", dpi=120)
    plt.close(fig)
    logger.image("active/curve", run_dir / "active_curve.png")
