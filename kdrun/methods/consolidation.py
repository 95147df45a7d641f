"""Representation consolidation: Li, Ravichandran, Fowlkes, Polito, Bhotika & Soatto, "Representation
Consolidation for Training Expert Students" (arXiv 2107.08039, 2021; the ICLR 2022 submission "Representation
Consolidation from Multiple Expert Teachers").

What the paper says (abstracts of both versions): standard distillation of a task-specific teacher *reduces* how
well the student's representation transfers to downstream tasks; a multi-head, multi-task distillation from the
task-specific teacher(s) plus a generalist teacher (ImageNet-pretrained features in their experiments), on an
unlabeled proxy dataset, consolidates them into a student that transfers better than the teacher(s) and than the
generalist's own features, without replaying the teachers' training data. The student has one head per teacher on
a shared representation, each head distilled from its own teacher only.

What kdrun does:

    loss = sum_k weight_k * T_k^2 * KL(softmax(t_k / T_k) || softmax(s_k / T_k))  +  ce_weight * CE(s_task, label)

t_k: teacher k's logits on the batch's image, s_k: the student's head k (a linear layer on the input of the
student's classifier, the shared feature); `task_head` is the index of the task teacher, whose head is the
student's own classifier, sized to the run's dataset (the distillation task): the run's test set scores it, and
`best.pt` is a plain classifier of the task whose classifier input is the consolidated representation (what a
transfer evaluation reads). The run's training images are the proxy data; `ce_weight` 0 (the default) uses none
of their labels, as the paper's unlabeled proxy.

A proxy broader than the task: `task_classes` names the run's classes that are the task teacher's, in its label
order (e.g. `dataset.classes=[1,3,5,7,8,9] method.task_classes=[2,3,5]` for a task teacher of [5, 7, 9]). The task
head is then the student's classifier's outputs of those classes (the others are never trained), and the run's
validation and test sets are their images, scored with the other classes' logits masked out; `ce_weight` must be 0
(the labels of the proxy's other classes have no task head to train).

Teachers (`teachers`, a list; needs_teacher is False: the method obtains its teachers itself, each frozen and in
eval mode): `{checkpoint: PATH}`, a checkpoint of an earlier kdrun run rebuilt from its `arch` record, or a model
preset `{name: resnet50, pretrained: true, num_classes: 1000}` (kwargs, in_chans as kdrun.models.create takes
them; with `checkpoint` beside `name`, its weights, e.g. a plain state_dict); each with `weight` (default 1) and
`temperature` (default: the method's `temperature`). Their logits are cached like any teacher's (`teacher.cache`).

Not settled by what could be read of the paper here (its abstracts; the method section was not available): the
heads' weights and temperatures (1 and the method's `temperature`, 1, by default: kdrun's KD default), the proxy
set's make-up, whether the task teachers are fine-tuned from the generalist and where the student starts. kdrun's
CPU-scale protocol (scripts/consolidation_table.py) fine-tunes the task teacher from the generalist
(`student.init`) and starts both students from the generalist (`student.init=GENERALIST/checkpoints/best.pt`), as
an expert library grown from one generalist would; `student.pretrained=true` is the ImageNet equivalent.
"""

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun import checkpoint, models
from kdrun.data import BatchSpec, class_positions
from kdrun.errors import KdrunError
from kdrun.features import probe_input
from kdrun.losses import kd_loss
from kdrun.methods.base import Method, Stage, accuracy, teacher_view
from kdrun.models.multihead import Concat, MultiHead

ENTRY_KEYS = {"checkpoint", "name", "pretrained", "num_classes", "kwargs", "in_chans", "weight", "temperature"}


class Consolidation(Method):
    ranges = {"task_head": "[0, inf)", "ce_weight": "[0, inf)", "temperature": "(0, inf)"}
    needs_teacher = False  # its teachers are method.teachers, built in setup
    batch_spec = BatchSpec(cacheable=True)

    def __init__(self, student, teacher=None, teachers: list | None = None, task_head: int = 1,
                 ce_weight: float = 0.0, temperature: float = 1.0, task_classes: list[int] | None = None):
        super().__init__(student, None)
        self.task_classes = tuple(_plain(task_classes)) if task_classes is not None else None
        self.evaluation_sets = None  # the run's own, unless the task is some of its classes (setup)
        self.register_buffer("task_label", None, persistent=False)  # likewise: each class's task label, or -1
        if self.task_classes is not None and ce_weight:
            raise KdrunError(f"method.ce_weight={ce_weight} with method.task_classes: the proxy's other classes have "
                             "no task head to train on their labels; give method.ce_weight=0 (an unlabeled proxy), or "
                             "the task as the run's dataset and method.task_classes=null")
        self.entries = [_entry(i, e) for i, e in enumerate(_plain(teachers) or [])]
        if not self.entries:
            raise KdrunError("method=consolidation has no teachers; give method.teachers=[{checkpoint: "
                             "GENERALIST.pt}, {checkpoint: TASK.pt}] (each may add weight and temperature)")
        if task_head >= len(self.entries):
            raise KdrunError(f"method.task_head={task_head} but there are {len(self.entries)} teachers; give the "
                             f"index (0..{len(self.entries) - 1}) of the task teacher in method.teachers")
        self.task_head, self.ce_weight, self.temperature = task_head, ce_weight, temperature
        self.weights = [float(e.get("weight", 1.0)) for e in self.entries]
        self.temperatures = [float(e.get("temperature", temperature)) for e in self.entries]

    def setup(self, data):
        members, names = zip(*(_teacher(i, e, data) for i, e in enumerate(self.entries)))
        x = probe_input(self.student, (data.in_chans, data.image_size, data.image_size))
        with torch.no_grad():
            classes = [m.eval()(x.to(next(m.parameters()).device)).shape[1] for m in members]
        task = self.task_classes
        if task is None and classes[self.task_head] != data.num_classes:
            raise KdrunError(f"method.teachers[{self.task_head}] (the task head) predicts {classes[self.task_head]} "
                             f"classes but {data.name} has {data.num_classes}; the run's dataset is the task: give its "
                             "teacher, point method.task_head at it, or name the task's classes among the dataset's "
                             "(method.task_classes)")
        if task is not None and (len(task) != classes[self.task_head] or len(set(task)) != len(task)
                                 or not all(0 <= c < data.num_classes for c in task)):
            raise KdrunError(f"method.task_classes={list(task)} must name, in the task teacher's label order, "
                             f"{classes[self.task_head]} distinct classes of the run's dataset "
                             f"(0..{data.num_classes - 1}), one per output of method.teachers[{self.task_head}]")
        self.teacher = Concat(list(members), classes, list(names)).requires_grad_(False).eval()
        self.net = MultiHead(self.student, models.classifier(self.student)[0], classes, self.task_head,
                             task_outputs=list(task) if task is not None else None)
        if task is not None:
            self.evaluation_sets = tuple(replace(s, classes=task, mask=task) for s in data.evaluation_sets())
            self.task_label = class_positions(task, data.num_classes)

    def stages(self, epochs):
        return [Stage("train", epochs, evaluate=self.evaluation_sets)]

    def training_step(self, batch):
        heads = self.net(batch["image"])
        targets = self.teacher.split(self.teacher_outputs(batch))
        losses = {f"kd/{k}": w * kd_loss(s, t, temp) for k, (s, t, w, temp)
                  in enumerate(zip(heads, targets, self.weights, self.temperatures)) if w}
        task, label = heads[self.task_head], batch["label"]
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(task, label)
        if self.task_label is None:
            return losses, {"acc": accuracy(task, label)}
        label = self.task_label[label]  # the task head's label of each image; -1: a class outside the task
        seen = label >= 0
        return losses, {"acc": ((task.argmax(1) == label) & seen).sum() / seen.sum().clamp(min=1)}

    @torch.no_grad()
    def teacher_outputs(self, batch):
        """(B, sum of the teachers' class counts): every teacher's logits side by side (or the cached ones)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch)
        return self.teacher(teacher_view(batch))


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _entry(i: int, entry) -> dict:
    """Teacher entry i of method.teachers, checked (one sentence per problem)."""
    field = f"method.teachers[{i}]"
    if not isinstance(entry, dict) or not (entry.get("checkpoint") or entry.get("name")):
        raise KdrunError(f"{field}={entry} names no teacher; give {{checkpoint: PATH}} (a kdrun run's "
                         "checkpoints/best.pt) or a model {name: NAME, pretrained: true, num_classes: N}")
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise KdrunError(f"{field} has the unknown key {unknown[0]}; a teacher entry takes {', '.join(sorted(ENTRY_KEYS))}")
    for key, low in (("weight", "[0"), ("temperature", "(0")):
        value = entry.get(key)
        bad = value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or value < 0 or (low == "(0" and value == 0))
        if bad:
            raise KdrunError(f"{field}.{key}={value} is not allowed; {key} takes a number "
                             f"{'>= 0' if low == '[0' else '> 0'}")
    path = entry.get("checkpoint")
    if path and not Path(path).expanduser().is_file():
        raise KdrunError(f"{field}.checkpoint={path} does not exist; give the checkpoints/best.pt of a kdrun run")
    return entry


def _teacher(i: int, entry: dict, data) -> tuple[torch.nn.Module, str]:
    """Teacher i built from its entry (rebuilt from a checkpoint's arch record, or a model preset), and its name."""
    field, path = f"method.teachers[{i}]", entry.get("checkpoint")
    if entry.get("name"):
        model = models.create(entry["name"], int(entry.get("num_classes") or data.num_classes),
                              in_chans=int(entry.get("in_chans") or data.in_chans),
                              pretrained=bool(entry.get("pretrained", False)), **(entry.get("kwargs") or {}))
        if path:
            checkpoint.load_weights(model, path, what=f"{field} teacher")
        return model, entry["name"]
    ckpt = checkpoint.load(path)
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if not isinstance(arch, dict):
        raise KdrunError(f"{field}.checkpoint={path} records no architecture (a plain state_dict?); give a "
                         "checkpoint a kdrun run wrote, or the model beside it ({name: NAME, num_classes: N, "
                         "checkpoint: PATH})")
    if arch.get("in_chans") != data.in_chans or not _close(arch.get("mean"), data.mean) \
            or not _close(arch.get("std"), data.std):
        raise KdrunError(f"{field}.checkpoint={path} was trained on {arch.get('in_chans')}-channel images normalised "
                         f"with mean {arch.get('mean')}, std {arch.get('std')}, but {data.name} gives it "
                         f"{data.in_chans}-channel images with mean {list(data.mean)}, std {list(data.std)}; give "
                         "teachers of the run's image domain")
    model = models.from_arch(arch)
    checkpoint.load_weights(model, path, what=f"{field} teacher")
    return model, arch.get("name") or f"teacher{i}"


def _close(a, b) -> bool:
    return a is None or (len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b)))
