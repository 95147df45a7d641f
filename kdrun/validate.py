"""The config checked once, before any data is read, any teacher trained or any file written.

`FIELDS` gives every field of the fixed groups a type and a range in one notation, `SPEC`:
`TYPE[?] [RANGE]`, TYPE one of int, float (an int will do), bool, str, list, dict, list[int], list[float],
list[str] (a range then holds for each element) or any; `?` allows null; RANGE an interval (`[0, 1]`,
`(0, inf)`) or a set of choices (`{cosine, step, constant}`). A method's fields are its class's `__init__`
parameters (following `**kwargs` up to the base class that takes them), typed by their annotations and
ranged by the class attribute `ranges` (name -> RANGE, merged along the class hierarchy). Keys that
nothing declares are errors, listing what is allowed. Each problem is one `KdrunError` sentence that names
the field, the value and what is allowed.
"""

import difflib
import inspect
import math
import re
import types
import typing
from functools import lru_cache
from importlib.resources import files

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdrun.errors import KdrunError

FIELDS = {
    "seed": "int",
    "resume": "bool",
    "teachers": "list",
    "logger": "dict",
    "paths": "dict",
    "method": "dict",
    "trainer.device": "str",
    "trainer.devices": "int [1, inf)",
    "trainer.precision": "any {32, bf16, 16-mixed}",
    "trainer.max_steps": "int? [1, inf)",
    "trainer.early_stopping_patience": "int? [1, inf)",
    "trainer.eval_every": "int [1, inf)",
    "trainer.eval_batch_size": "int [1, inf)",
    "trainer.log_every": "int [1, inf)",
    "trainer.num_workers": "int [0, inf)",
    "trainer.compile": "bool",
    "trainer.channels_last": "bool",
    "trainer.grad_clip": "float? (0, inf)",
    "trainer.accumulate_grad_batches": "int [1, inf)",
    "trainer.ema_decay": "float? (0, 1)",
    "trainer.checkpoint_every_steps": "int? [1, inf)",
    "trainer.snapshot_epochs": "list[int] [1, inf)",
    "schedule.epochs": "int [1, inf)",
    "schedule.batch_size": "int [1, inf)",
    "schedule.lr_schedule": "str {cosine, step, constant}",
    "schedule.warmup_epochs": "float [0, inf)",
    "schedule.milestones": "list[float] [0, inf)",
    "schedule.gamma": "float (0, inf)",
    "schedule.optimizer": "dict",
    "schedule.optimizer.lr": "float [0, inf)",
    "schedule.optimizer.weight_decay": "float [0, inf)",
    "schedule.optimizer.momentum": "float [0, inf)",
    "schedule.lr_groups": "dict?",
    "schedule.layer_decay": "float? (0, 1]",
    "dataset.name": "str",
    "dataset.num_classes": "int? [1, inf)",
    "dataset.in_chans": "int? [1, inf)",
    "dataset.image_size": "int? [1, inf)",
    "dataset.mean": "list[float]?",
    "dataset.std": "list[float]? (0, inf)",
    "dataset.augment": "dict?",
    "dataset.augment.crop_padding": "int [0, inf)",
    "dataset.augment.flip": "bool",
    "dataset.augment.random_resized_crop": "bool",
    "dataset.augment.test_resize_ratio": "float (0, inf)",
    "dataset.root": "str",
    "dataset.download": "bool",
    "dataset.skip_bad_images": "bool",
    "dataset.source": "dict",
    "dataset.labeled_per_class": "int? [1, inf)",
    "dataset.labeled_fraction": "float? (0, 1)",
    "dataset.split_seed": "int",
    "dataset.val_size": "float? (0, inf)",
    "dataset.classes": "list[int]? [0, inf)",
    **{f"{role}.{key}": spec for role in ("teacher", "student") for key, spec in {
        "name": "str?", "kwargs": "dict", "pretrained": "bool", "feature_layers": "list[str]?",
        "normalize": "dict?", "normalize.mean": "list[float]", "normalize.std": "list[float] (0, inf)"}.items()},
    "teacher.checkpoint": "str?",
    "teacher.epochs": "int [0, inf)",
    "teacher.schedule": "str?",
    "teacher.seed": "int",
    "teacher.snapshot_epochs": "list[int] [1, inf)",
    "teacher.cache": "any {auto, true, false}",
    "teacher.cache_views": "int [1, inf)",
    "teacher.init": "str?",
    "student.init": "str?",
    "student.freeze": "list[str]",
    "transfer.layer": "str?",
    "transfer.protocols": "list[str] {linear_probe, finetune}",
    "transfer.epochs": "int [1, inf)",
    "transfer.schedule": "str",
    "transfer.batch_size": "int? [1, inf)",
    "transfer.lr_scale": "dict",
    "transfer.lr_scale.linear_probe": "float (0, inf)",
    "transfer.lr_scale.finetune": "float (0, inf)",
    "transfer.tasks": "dict?",
    "student.drop_rate": "float? [0, 1)",
    "student.drop_path_rate": "float? [0, 1)",
    "curriculum.bands": "list[int] [1, inf)",
    "curriculum.reference_size": "int [1, inf)",
    "curriculum.magnitudes": "list[int] [0, 30]",
    "curriculum.num_ops": "int [0, inf)",
    "curriculum.teacher_full_size": "bool",
    "curriculum.pacing": "str {linear, exponential}",
    "curriculum.start": "float (0, 1]",
    "curriculum.ramp": "float [0, 1]",
    "curriculum.scorer": "str?",
    "active.heuristic": "str {random, entropy, margin, least_confidence, bald, ensemble, consistency}",
    "active.initial": "int [1, inf)",
    "active.init": "str {stratified, random}",
    "active.query": "int [1, inf)",
    "active.rounds": "int [0, inf)",
    "active.warm_start": "bool",
    "active.steps": "int? [1, inf)",
    "active.pool_size": "int? [1, inf)",
    "active.drop_hardest": "float [0, 1)",
    "active.mc_samples": "int [2, inf)",
    "active.ensemble_size": "int [2, inf)",
    "active.augmentations": "int [2, inf)",
}
# Nodes whose keys belong to something else (an optimizer's, a model's, a data source's arguments).
OPEN = {"logger", "paths", "method", "teachers", "schedule.optimizer", "dataset.source", "teacher.kwargs",
        "student.kwargs", "schedule.lr_groups", "transfer.tasks"}

_UNSET = {"dataset.root": "DIR (a folder holding train/<class>/ and val/<class>/)"}  # what to give, when unset
_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list",
          "dict": "a mapping", "any": "a value"}
_ABSENT = object()


def check(cfg: DictConfig) -> None:
    """Raise a one-sentence `KdrunError` for the first field of `cfg` (a composed kdrun config) that is unknown,
    unset, of the wrong type or out of range, or for a combination that cannot run; return None otherwise."""
    for node in ["", *sorted({p.rsplit(".", 1)[0] for p in FIELDS if "." in p} - OPEN)]:
        value = _get(cfg, node) if node else cfg
        if isinstance(value, DictConfig) and "_target_" not in value:  # a _target_'s own arguments sit beside it
            _known_keys(node, value, _allowed(node), f"{node or 'the config'} takes")
    for path, spec in FIELDS.items():
        value = _get(cfg, path)
        if value is not _ABSENT:
            _check_value(path, value, spec)
    _check_method(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))  # ??? anywhere else: in a method's list of teachers, say
    if missing:
        path = re.sub(r"\[(\d+)\]", r".\1", missing[0])  # method.teachers[1].checkpoint, as an override names it
        raise KdrunError(f"{path} has no value and this config needs one; give it on the command line: {path}=VALUE")
    for problem in _combinations(cfg):
        if problem:
            raise KdrunError(problem)


def _combinations(cfg: DictConfig):
    """Fields that are each fine but not together; each yields a sentence when they are not."""
    from hydra.utils import get_class

    teacher = cfg.teacher
    method = get_class(cfg.method._target_)
    needs = method.needs_teacher and not cfg.get("teachers")
    for role, used in (("student", True), ("teacher", needs or method.trains_teacher)):
        yield (used and not cfg[role].get("name")
               and f"{role}.name is not set, so the {role} names no model; choose a preset ({role}=cnn), set "
                   f"{role}.name=NAME, or {role}._target_=mypkg.MyNet for a model of your own")
    yield (needs and teacher.get("epochs") == 0 and not teacher.get("pretrained") and not teacher.get("checkpoint")
           and f"teacher.epochs=0 uses the teacher as it is, but teacher.name={teacher.name} is neither pretrained "
               "nor loaded, so it would be random; set teacher.pretrained=true or teacher.checkpoint=PATH, or train "
               "it with teacher.epochs >= 1")
    patience = cfg.trainer.get("early_stopping_patience")
    yield (patience is not None and cfg.dataset.get("val_size") is None
           and f"trainer.early_stopping_patience={patience} stops on validation accuracy, and there are no validation "
               "images; hold some out with dataset.val_size=N (or a fraction such as 0.1)")
    per_class, fraction = cfg.dataset.get("labeled_per_class"), cfg.dataset.get("labeled_fraction")
    yield (per_class is not None and fraction is not None
           and f"dataset.labeled_per_class={per_class} and dataset.labeled_fraction={fraction} both set the labeled "
               "part; give one of them")


# ---- methods ------------------------------------------------------------------------------------------
def method_fields(cls: type) -> dict[str, str | None]:
    """The options a method class takes (its `__init__` parameters and, through `**kwargs`, its bases'), each
    with its SPEC from the annotation and the merged `ranges` (None: anything)."""
    ranges = {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("ranges", {}))
    fields = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that cannot be evaluated here: its field goes untyped
            hints = {}
        for p in params:
            if p.name not in ("self", "student", "teacher") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                fields.setdefault(p.name, _spec(hints.get(p.name), ranges.get(p.name)))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return fields


def _spec(hint, range_: str | None) -> str | None:
    """A SPEC from a type annotation (int, float, bool, str, dict, list, X | None) and a RANGE."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    optional = type(None) in args
    if args:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else None
    name = getattr(typing.get_origin(hint) or hint, "__name__", None)
    name = name if name in _TYPES else ("float" if range_ and not range_.startswith("{") else "any")
    if name == "any" and not range_ and not optional:
        return None
    return f"{name}{'?' if optional else ''}{' ' + range_ if range_ else ''}"


def _check_method(cfg: DictConfig) -> None:
    from hydra.utils import get_class

    target = cfg.method.get("_target_")
    try:
        cls = get_class(target)
    except Exception as e:
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise KdrunError(f"method._target_={target} cannot be imported ({why}); pick a method with method=NAME "
                         "(kdrun --help lists them)") from None
    fields = method_fields(cls)
    _known_keys("method", cfg.method, set(fields), f"the method {cls.__name__} takes")
    for name, spec in fields.items():
        value = _get(cfg, f"method.{name}")
        if spec and value is not _ABSENT:
            _check_value(f"method.{name}", value, spec)


# ---- the notation ---------------------------------------------------------------------------------------
_SPEC = re.compile(r"(?P<type>[a-z]+(?:\[(?P<item>[a-z]+)\])?)(?P<null>\?)?(?:\s+(?P<range>.+))?$")
_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")


@lru_cache(maxsize=None)
def _parse(spec: str):
    """(type, element type, null allowed, choices, interval as (closed, low, high, closed)) of a SPEC."""
    m = _SPEC.match(spec.strip())
    range_ = m["range"] if m else None
    choices = {c.strip() for c in range_[1:-1].split(",")} if range_ and range_.startswith("{") else None
    interval = _INTERVAL.match(range_) if range_ and choices is None else None
    if m is None or m["type"].split("[")[0] not in _TYPES or (range_ and choices is None and interval is None):
        raise ValueError(f"bad field spec {spec!r}: give TYPE[?] [RANGE], e.g. 'float? (0, inf)'")
    if interval:
        lo_b, lo, hi, hi_b = interval.groups()
        interval = (lo_b == "[", float(lo), float(hi), hi_b == "]")
    return m["type"], m["item"], bool(m["null"]), choices, interval


def _describe(spec: str) -> str:
    """What a SPEC allows, in words: 'an integer >= 1, or null'."""
    kind, item, null, choices, interval = _parse(spec)
    words = f"a list of {_TYPES[item].split(' ', 1)[1]}s" if item else _TYPES[kind]
    if choices:
        words = f"one of {', '.join(sorted(choices))}"
    elif interval:
        lo_in, lo, hi, hi_in = interval
        each = " each" if item else ""
        if hi == math.inf:
            words += f"{each} {'>=' if lo_in else '>'} {_num(lo)}"
        else:
            words += f"{each} in {'[' if lo_in else '('}{_num(lo)}, {_num(hi)}{']' if hi_in else ')'}"
    return words + (", or null" if null else "")


def _ok(value, kind: str, choices, interval) -> bool:
    if choices is not None:
        return _show(value) in choices
    if kind == "int":
        good = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        good = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "list":
        good = isinstance(value, (list, tuple, ListConfig))
    elif kind == "dict":
        good = isinstance(value, (dict, DictConfig))
    else:
        good = kind == "any" or isinstance(value, {"bool": bool, "str": str}[kind])
    if good and interval is not None:
        lo_in, lo, hi, hi_in = interval
        good = (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)
    return good


def _check_value(path: str, value, spec: str) -> None:
    kind, item, null, choices, interval = _parse(spec)
    if value is None:
        good = null
    elif item:
        good = _ok(value, "list", None, None) and all(_ok(v, item, choices, interval) for v in value)
    else:
        good = _ok(value, kind, choices, interval)
    if not good:
        raise KdrunError(f"{path}={_show(value)} is not allowed; {path} takes {_describe(spec)}")


# ---- reading the config -------------------------------------------------------------------------------
def _get(cfg: DictConfig, path: str):
    """The value at `path` (resolved), or _ABSENT; one sentence when it is unset (???) or does not resolve."""
    node = cfg
    for part in path.split("."):
        if not isinstance(node, DictConfig):
            return _ABSENT
        if OmegaConf.is_missing(node, part):
            raise KdrunError(f"{path} has no value and this config needs one; give it on the command line: "
                             f"{path}={_UNSET.get(path, 'VALUE')}")
        if part not in node:
            return _ABSENT
        try:
            node = node[part]
        except OmegaConfBaseException as e:
            raise KdrunError(f"{path} cannot be read: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    return node


def _known_keys(path: str, node: DictConfig, allowed: set[str], what: str) -> None:
    for key in node.keys():
        key = str(key)
        if key.startswith("_") or key in allowed:
            continue
        full = f"{path}.{key}" if path else key
        near = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {path + '.' if path else ''}{near[0]}?)" if near else ""
        raise KdrunError(f"unknown key {full}{hint}; {what} {', '.join(sorted(allowed))}")


@lru_cache(maxsize=None)
def _allowed(node: str) -> frozenset[str]:
    """The keys a node may hold: its fields in FIELDS and every key a shipped config (conf/config.yaml and the
    options of the node's group, e.g. each conf/dataset/*.yaml) gives it; at the top, also every config group."""
    depth = node.count(".") + 1 if node else 0
    keys = {p.split(".")[depth] for p in FIELDS if p.startswith(node + ".") or not node}
    conf = files("kdrun.conf")
    sources = [(OmegaConf.load(conf / "config.yaml"), node)]
    if node:
        group, _, rest = node.partition(".")
        if conf.joinpath(group).is_dir():
            sources += [(OmegaConf.load(f), rest) for f in conf.joinpath(group).iterdir() if f.name.endswith(".yaml")]
    else:
        keys |= {d.name for d in conf.iterdir() if d.is_dir() and not d.name.startswith(("_", "hydra"))}
    for loaded, sub in sources:
        found = OmegaConf.select(loaded, sub) if sub else loaded
        if isinstance(found, DictConfig):
            keys |= {str(k) for k in found.keys() if k not in ("defaults", "hydra")}
    return frozenset(keys)


def _show(value) -> str:
    """A value as a user writes it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value, resolve=False)).replace("'", "")
    return str(value)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)
