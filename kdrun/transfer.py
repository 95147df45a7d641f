"""The transfer evaluation (`transfer=` config group, and `kdrun-transfer` for any checkpoint): how well a model's
features carry to downstream tasks.

For each task (a dataset preset, optionally a class subset: `{dataset: fashion_mnist, classes: [0, 2, 4, 6]}`) and
each protocol, a copy of the model gets a fresh linear head on one of its features and is trained by the same engine
(`kdrun.engine.train`, `kdrun.methods.supervised.Supervised`) for `transfer.epochs`, in
`<run dir>/transfer/<task>/<protocol>/`:
- `linear_probe`: only the head trains; the model is frozen and kept in eval mode (BatchNorm statistics, dropout);
- `finetune`: the head and every parameter the feature depends on train.
The test set only reports: the final epoch's test accuracy is the result (`transfer/<task>/acc` for the probe,
`transfer/<task>/finetune/acc`), with the validation accuracy beside it when the task's data hold some out
(`.../val_acc`; config.yaml's shared dataset fields hold a tenth out unless the task sets `val_size: null`).

The feature (`transfer.layer`): a module path of the model (`PATH:in` for its input), pooled to a vector (the mean
over the spatial positions of a feature map, over the tokens of a (B, N, C) sequence). By default (null) it is the
feature the model declares in a `feature_layer` attribute (a spec such as "backbone" or "heads.0:in": how a
multi-head student names the feature its heads share), else the input of the last nn.Linear its forward calls
(its classifier's input; for several heads on one feature, that shared feature).
"""

import copy
import json
import logging
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun import checkpoint, engine, features, validate
from kdrun import data as kdata
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.methods.base import Stage
from kdrun.methods.supervised import Supervised
from kdrun.teacher import preset as config_preset
from kdrun.tools import atomic

log = logging.getLogger(__name__)

PROTOCOLS = ("linear_probe", "finetune")
DATASET_FIELDS = {p.split(".")[1] for p in validate.FIELDS if p.startswith("dataset.")}


class _Stop(Exception):
    """Raised by the feature hook: the forward pass ends at the feature (nothing after it runs)."""

    def __init__(self, feature: torch.Tensor):
        super().__init__()
        self.feature = feature


class Probe(nn.Module):
    """`encoder` (a model) read up to its feature `layer`, pooled, then a fresh linear `head` of `num_classes`.
    `frozen`: the encoder does not train and stays in eval mode (a linear probe); else the head and every encoder
    parameter the feature depends on train (a fine-tune). `shape`: the (C, H, W) of the task's images."""

    def __init__(self, encoder: nn.Module, layer: str, num_classes: int, shape, frozen: bool):
        super().__init__()
        self.encoder, self.layer, self.frozen = encoder, layer, frozen
        module = features.resolve(encoder, layer, "model")
        if layer.endswith(features.INPUT_SUFFIX):  # the forward pass ends where the feature is read
            module.register_forward_pre_hook(self._stop_at_input)
        else:
            module.register_forward_hook(self._stop_at_output)
        encoder.__dict__.pop("frozen_prefixes", None)  # the run's own student.freeze is the run's, not the task's
        encoder.requires_grad_(not frozen)
        x = features.probe_input(encoder, shape)
        mode = encoder.training
        encoder.eval()
        with torch.enable_grad():
            feature = self.features(x)
        encoder.train(mode)
        self.head = nn.Linear(feature.shape[1], num_classes).to(x.device)
        if not frozen:  # what the feature does not depend on (the old classifier) gets no gradient: it does not train
            params = list(encoder.parameters())
            grads = torch.autograd.grad(feature.float().sum(), params, allow_unused=True)
            for p, g in zip(params, grads):
                p.requires_grad_(g is not None)

    @staticmethod
    def _stop_at_input(module, args):
        raise _Stop(args[0])

    @staticmethod
    def _stop_at_output(module, args, output):
        raise _Stop(output)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vectors of a batch."""
        try:
            self.encoder(x)
        except _Stop as stop:
            f = stop.feature
        else:
            raise KdrunError(f"transfer.layer={self.layer} is not called in the model's forward pass; name a module "
                             "the forward pass uses")
        if f.ndim == 3:  # tokens (B, N, C)
            return f.mean(1)
        return f.flatten(2).mean(2) if f.ndim > 3 else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self


def feature_layer(model: nn.Module, shape, layer: str | None = None) -> str:
    """The feature spec `layer`, else the one `model` declares (`feature_layer`), else its classifier's input."""
    layer = layer or getattr(model, "feature_layer", None)
    if layer:
        features.resolve(model, layer, "model")  # an unknown path: one sentence listing the valid ones
        return layer
    return features.classifier_input(model, features.probe_input(model, shape), "model")


def task_dataset(name: str, task: DictConfig, data_dir: str) -> DictConfig:
    """The dataset config of task `name`: its preset (conf/dataset) over config.yaml's shared dataset fields, with
    the task's own dataset fields (`classes`, `val_size`, ...) over both."""
    if not isinstance(task, DictConfig) or not task.get("dataset"):
        raise KdrunError(f"transfer.tasks.{name}={task} names no dataset; give each task a dataset preset, e.g. "
                         f"{name}: {{dataset: digits, classes: [0, 1, 2]}}")
    extra = {k: v for k, v in task.items() if k != "dataset"}
    for key, value in extra.items():
        if key not in DATASET_FIELDS:
            raise KdrunError(f"transfer.tasks.{name}.{key} is not a dataset field; a task takes dataset (a preset) "
                             f"and dataset fields: {', '.join(sorted(DATASET_FIELDS))}")
        try:
            validate._check_value(f"dataset.{key}", value, validate.FIELDS[f"dataset.{key}"])
        except KdrunError as e:
            raise KdrunError(f"transfer.tasks.{name}: {e}") from None
    shared = OmegaConf.load(files("kdrun.conf") / "config.yaml").dataset
    preset = config_preset("dataset", str(task.dataset), f"transfer.tasks.{name}.dataset={task.dataset}",
                     "or add conf/dataset/<name>.yaml")
    root = OmegaConf.create({"paths": {"data_dir": data_dir}, "dataset": OmegaConf.merge(shared, preset, extra)})
    return root.dataset


def prepare(cfg: DictConfig, data_dir: str) -> dict[str, kdata.Data]:
    """The data of every task of `cfg` (the `transfer` group), read up front so a mistake stops before training."""
    if not cfg.get("tasks"):
        raise KdrunError("transfer.tasks is empty; give downstream tasks, e.g. transfer.tasks={digits: {dataset: "
                         "digits}} or a preset (transfer=fashion_tops_digits)")
    unknown = [p for p in cfg.protocols if p not in PROTOCOLS]
    if unknown or not cfg.protocols:
        raise KdrunError(f"transfer.protocols={list(cfg.protocols)}; use one or both of {', '.join(PROTOCOLS)}")
    schedule(cfg)
    out = {}
    for name, task in cfg.tasks.items():
        if "/" in str(name):
            raise KdrunError(f"transfer task '{name}' has a '/' in its name, which summary keys use; rename it")
        dataset = task_dataset(str(name), task, data_dir)
        try:
            out[str(name)] = kdata.build(dataset)
        except KdrunError as e:
            raise KdrunError(f"transfer task '{name}': {e}") from None
    return out


def schedule(cfg: DictConfig) -> DictConfig:
    """The probes' schedule: the conf/schedule preset `transfer.schedule`, for `transfer.epochs`, with
    `transfer.batch_size` when it is set."""
    preset = config_preset("schedule", str(cfg.schedule), f"transfer.schedule={cfg.schedule}", "as in schedule=")
    batch = {"batch_size": cfg.batch_size} if cfg.get("batch_size") else {}
    return OmegaConf.merge(preset, {"epochs": cfg.epochs, **batch})


def evaluate(model: nn.Module, cfg: DictConfig, tasks: dict[str, kdata.Data], out_dir: Path, trainer: DictConfig,
             device, seed: int = 0) -> dict[str, float]:
    """Train the probes of `cfg` (the `transfer` group) on `model`'s features for every task of `tasks` (`prepare`)
    and protocol, each in `out_dir/<task>/<protocol>/`; the summary entries `transfer/<task>/acc`,
    `transfer/<task>/finetune/acc` (and `.../val_acc`). A probe already finished there is read back; one cut
    short continues from its last.pt."""
    from kdrun.run import seed_everything

    probe_schedule = schedule(cfg)
    trainer = OmegaConf.merge(trainer, {"early_stopping_patience": None, "snapshot_epochs": [], "ema_decay": None,
                                        "checkpoint_every_steps": None, "devices": 1, "compile": False})
    scales = cfg.get("lr_scale") or {}
    results = {}
    for name, data in tasks.items():
        shape = (data.in_chans, data.image_size, data.image_size)
        for protocol in cfg.protocols:
            run_dir = Path(out_dir) / name / protocol
            done = run_dir / "result.json"
            if done.is_file():
                summary = json.loads(done.read_text())
            else:
                seed_everything(seed)
                encoder = copy.deepcopy(model).to(device)
                try:
                    layer = feature_layer(encoder, shape, cfg.get("layer"))
                    probe = Probe(encoder, layer, data.num_classes, shape, frozen=protocol == "linear_probe")
                except RuntimeError as e:
                    raise KdrunError(f"transfer task '{name}': the model cannot read {data.name}'s "
                                     f"{'x'.join(map(str, shape))} images ({str(e).splitlines()[0]}); choose tasks "
                                     "whose images have the channels (and, for an MLP, the size) it was trained on") from e
                method = Supervised(probe).to(device)
                loaders = kdata.Loaders(data, method.batch_spec, probe_schedule.batch_size, trainer.eval_batch_size,
                                        device, seed=seed, num_workers=trainer.num_workers)
                last = run_dir / "checkpoints" / "last.pt"
                log.info("transfer: %s on %s (%s, %d classes), the feature %s, %d epochs", protocol, name, data.name,
                         data.num_classes, layer, probe_schedule.epochs)
                logger = RunLogger(run_dir)
                try:
                    summary = engine.train(method, loaders, probe_schedule, trainer, run_dir=run_dir, logger=logger,
                                           device=device, desc=f"transfer {name} {protocol}",
                                           resume=last if last.is_file() else None,
                                           stages=[Stage(protocol, probe_schedule.epochs,
                                                         lr_scale=float(scales.get(protocol, 1.0)))])
                finally:
                    logger.close()
                summary = {"test/acc": summary["test/acc"], "val/acc": summary.get("val/acc"),
                           "params_trained": sum(p.numel() for p in probe.parameters() if p.requires_grad),
                           "layer": layer}
                with atomic(done) as tmp:  # present only once the probe has finished
                    tmp.write_text(json.dumps(summary, indent=1) + "\n")
            key = f"transfer/{name}" + ("" if protocol == "linear_probe" else f"/{protocol}")
            results[f"{key}/acc"] = summary["test/acc"]
            if summary.get("val/acc") is not None:
                results[f"{key}/val_acc"] = summary["val/acc"]
    return results


def evaluate_run(cfg: DictConfig, method: nn.Module, run_dir: Path, device,
                 tasks: dict[str, kdata.Data] | None = None) -> dict[str, float]:
    """The transfer evaluation a run asks for (`cfg.transfer`; `tasks`: its `prepare`d data) of its chosen
    student: `checkpoints/best.pt` when it wrote one, else `method.eval_model()`; in `run_dir/transfer/`."""
    tasks = tasks if tasks is not None else prepare(cfg.transfer, str(cfg.paths.data_dir))
    model = copy.deepcopy(method.eval_model())
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        model.load_state_dict(checkpoint.load(best)["model"])
    return evaluate(model.eval(), cfg.transfer, tasks, run_dir / "transfer", cfg.trainer, device, cfg.seed)
