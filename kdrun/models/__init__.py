"""kdrun's model zoo: ``create`` builds kdrun's own nets, torchvision models and timm models by name.

Every model it returns has ``default_feature_layers``: module paths (keys of ``dict(model.named_modules())``)
of the outputs of its main stages, lowest first, ending with the last stage (a 1x1 head conv or a final
BN-ReLU after it is not a stage); forward hooks on them give the features that feature-based distillation
methods use. kdrun's CIFAR nets list the CRD benchmark's (RepDistiller's ``feat[1:-1]``) and may also name the
stem's output (``stem_layer``, its ``feat[0]``) and the stages' pre-ReLU responses (``preact_layers``).

A `teacher`/`student` preset names one of them (`name`, `kwargs`) or, with Hydra's `_target_`, any importable
model class or function, its arguments beside `_target_` (or in `kwargs`); `num_classes`, `in_chans` and
`image_size` are passed where its signature names them and the preset does not.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
from importlib.resources import files
from typing import Any, Callable

import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch import nn

from kdrun.errors import KdrunError, instantiate
from kdrun.models import inputs, mobilenetv2, resnet_cifar, shufflenet, small, vgg, wrn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet_cifar.resnet8,
    "resnet14": resnet_cifar.resnet14,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet44": resnet_cifar.resnet44,
    "resnet56": resnet_cifar.resnet56,
    "resnet110": resnet_cifar.resnet110,
    "resnet8x4": resnet_cifar.resnet8x4,
    "resnet32x4": resnet_cifar.resnet32x4,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "wrn": wrn.wrn,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "mobilenetv2": mobilenetv2.mobilenetv2,
    "shufflenetv1": shufflenet.shufflenetv1,
    "shufflenetv2": shufflenet.shufflenetv2,
    "mlp": small.mlp,
    "cnn": small.cnn,
}

_TIMM_PREFIX = "timm:"
_TORCHVISION_PREFIX = "torchvision:"


def list_models() -> list[str]:
    """The names of kdrun's own nets."""
    return list(_REGISTRY)


def build(cfg, data) -> nn.Module:
    """A model preset (the `teacher` or `student` config group) at the classes and channels of `data`
    (a `kdrun.data.Data`), started from the weights its `init` names (`load_init`) and with the parts its `freeze`
    names frozen (`freeze`)."""
    if not cfg.get("name"):
        role = cfg._key() or "model"
        raise KdrunError(f"the {role} names no model; choose a preset ({role}=cnn) or set {role}.name=NAME, or "
                         f"{role}._target_=mypkg.MyNet for a model of your own")
    kwargs = constructor_kwargs(cfg)
    for key in ("drop_rate", "drop_path_rate"):  # a noised student; kdrun's own nets call dropout `dropout`
        if cfg.get(key):
            kwargs["dropout" if key == "drop_rate" and cfg.name in _REGISTRY else key] = cfg[key]
    if cfg.get("_target_"):
        model = create_target(cfg._target_, kwargs, data.num_classes, data.in_chans, data.image_size,
                              field=f"{cfg._key()}._target_" if cfg._key() else "_target_")
    else:
        model = create(cfg.name, data.num_classes, in_chans=data.in_chans, pretrained=cfg.get("pretrained", False),
                       **kwargs)
    role = cfg._key() or "model"
    if cfg.get("init"):  # student.init / teacher.init: start from a file's weights
        load_init(model, cfg.init, f"{role}.init")
    freeze(model, cfg.get("freeze"), f"{role}.freeze")
    if cfg.get("normalize"):  # the model's own input normalisation, in front of it alone
        inputs.renormalize(model, data.mean, data.std, cfg.normalize, f"{role}.normalize")
    if cfg.get("pretrained"):
        inputs.check_pretrained_input(model, cfg, data, role)
    return model


def constructor_kwargs(cfg) -> dict:
    """The arguments a model preset gives its model: `kwargs`, and for a `_target_` preset its other own keys."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if cfg.get("_target_"):
        kwargs = {**{k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in _preset_fields()},
                  **kwargs}
    return kwargs


@functools.cache
def _preset_fields() -> frozenset[str]:
    """The fields every teacher/student preset has (config.yaml's `teacher` and `student`): no model's arguments."""
    base = OmegaConf.load(files("kdrun.conf") / "config.yaml")
    return frozenset({"_target_", *base.teacher, *base.student})


def arch(cfg, data) -> dict:
    """What a checkpoint records of a model preset's model: enough to rebuild it (`from_arch`), to explain a
    mismatch and to preprocess its input (mean, std, image size)."""
    record = {"name": cfg.name, "kwargs": constructor_kwargs(cfg), "dataset": data.name,
              "num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size,
              "mean": list(data.mean), "std": list(data.std)}
    if cfg.get("_target_"):
        record["target"] = cfg._target_
    if cfg.get("normalize"):
        record["normalize"] = OmegaConf.to_container(cfg.normalize, resolve=True)
    classes = getattr(data.splits.test, "classes", None)  # an image folder's class names
    if classes is not None:
        record["classes"] = list(classes)
    return record


def from_arch(record: dict) -> nn.Module:
    """The (untrained) model a checkpoint's `arch` record describes, re-normalising its input as it did."""
    if record.get("target"):
        model = create_target(record["target"], dict(record["kwargs"]), record["num_classes"], record["in_chans"],
                              record.get("image_size"))
    else:
        model = create(record["name"], record["num_classes"], in_chans=record["in_chans"], **record["kwargs"])
    if record.get("normalize"):
        inputs.renormalize(model, record["mean"], record["std"], record["normalize"], "normalize")
    return model


def create_target(target: str, kwargs: dict, num_classes: int, in_chans: int, image_size: int | None,
                  field: str = "_target_") -> nn.Module:
    """The model Hydra's `_target_` names, called with `kwargs` and those of `num_classes`, `in_chans` and
    `image_size` that its signature names and `kwargs` do not give; `field` names the setting in errors."""
    module, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise KdrunError(f"{field}={target} cannot be imported ({type(e).__name__}: {e}); "
                         "give the dotted path of a model class or function that Python can import (put its "
                         "package on PYTHONPATH)") from e
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    given = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    kwargs = {**{k: v for k, v in given.items() if k in params and v is not None}, **kwargs}
    try:
        model = instantiate({"_target_": target, "_convert_": "all", **kwargs})
    except InstantiationException as e:
        raise KdrunError(f"{field}={target} failed with the arguments {sorted(kwargs)} ({e.__cause__ or e}); "
                         "give the arguments its signature takes") from e
    if not isinstance(model, nn.Module) or next(model.parameters(), None) is None:
        what = "a model without parameters" if isinstance(model, nn.Module) else f"a {type(model).__name__}"
        raise KdrunError(f"{field}={target} gives {what}, not a trainable torch.nn.Module; name a model class or a "
                         "function that returns one")
    return model


def create(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and ``in_chans`` input channels.

    Looks ``name`` up in kdrun's own nets, then torchvision's classification models, then timm's;
    ``timm:NAME`` and ``torchvision:NAME`` skip the lookup (e.g. for torchvision's own ``vgg11``).
    ``kwargs`` go to the model's constructor. Raises ``KdrunError`` for unknown names or arguments.
    """
    if name.startswith(_TIMM_PREFIX):
        return _create_timm(name[len(_TIMM_PREFIX) :], num_classes, in_chans, pretrained, kwargs)
    if name.startswith(_TORCHVISION_PREFIX):
        return _create_torchvision(name[len(_TORCHVISION_PREFIX) :], num_classes, in_chans, pretrained, kwargs)
    if name in _REGISTRY:
        return _create_own(name, num_classes, in_chans, pretrained, kwargs)
    if name in _torchvision_names():
        return _create_torchvision(name, num_classes, in_chans, pretrained, kwargs)
    import timm

    if timm.is_model(name):
        return _create_timm(name, num_classes, in_chans, pretrained, kwargs)
    candidates = list(_REGISTRY) + _torchvision_names() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.8)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise KdrunError(
        f"unknown model '{name}'{hint}: not a kdrun model ({', '.join(_REGISTRY)}), a torchvision model "
        f"or a timm model; check the spelling, or prefix a timm name with '{_TIMM_PREFIX}'"
    )


def _create_own(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    if pretrained:
        raise KdrunError(
            f"kdrun's own model '{name}' has no pretrained weights; set pretrained to false and load "
            "trained weights with teacher.checkpoint=PATH"
        )
    constructor = _REGISTRY[name]
    params = inspect.signature(constructor).parameters
    extra = [p for p in params if p not in ("num_classes", "in_chans")]
    unknown = sorted(set(kwargs) - set(extra))
    if unknown:
        accepted = ", ".join(extra) if extra else "none"
        raise KdrunError(f"model '{name}' does not take {', '.join(unknown)}; the arguments it takes are: {accepted}")
    missing = [p for p in extra if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise KdrunError(f"model '{name}' needs the arguments {', '.join(missing)}; pass them with the model name")
    return constructor(num_classes=num_classes, in_chans=in_chans, **kwargs)


@contextlib.contextmanager
def _downloading(name: str):
    """Pretrained weights that cannot be fetched (no internet, no cached copy) stop with one sentence."""
    try:
        yield
    except OSError as err:  # urllib's URLError, huggingface_hub's connection and cache errors
        raise KdrunError(f"the pretrained weights of '{name}' could not be downloaded ({type(err).__name__}); run once "
                         "with internet access (torchvision and timm cache them), or set pretrained=false and give "
                         "the weights with init=PATH") from err


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _create_torchvision(
    name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]
) -> nn.Module:
    """A torchvision classification model; a pretrained one keeps its weights and gets a fresh head if needed."""
    import torchvision

    if name not in _torchvision_names():
        raise KdrunError(f"unknown torchvision model '{name}'; torchvision.models.list_models() lists the names")
    try:
        if pretrained:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            with _downloading(name):
                model = torchvision.models.get_model(name, weights=weights, **kwargs)
            if len(weights.meta["categories"]) != num_classes:
                _replace_head(model, name, len(weights.meta["categories"]), num_classes)
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise KdrunError(f"torchvision model '{name}' does not take the arguments {sorted(kwargs)}: {err}") from err
    if in_chans != 3:
        _adapt_first_conv(model, name, in_chans, pretrained)
        if getattr(model, "transform_input", False):
            model.transform_input = False  # GoogLeNet/Inception re-normalise exactly three channels
    is_resnet = isinstance(model, torchvision.models.ResNet)
    model.default_feature_layers = ["layer1", "layer2", "layer3", "layer4"] if is_resnet else []
    return model


def _create_timm(name: str, num_classes: int, in_chans: int, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise KdrunError(f"unknown timm model '{name}'; check the spelling against timm.list_models('*pattern*')")
    try:
        with _downloading(name):
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:
        raise KdrunError(f"timm model '{name}' does not take the arguments {sorted(kwargs)}: {err}") from err
    paths = dict(model.named_modules())
    feature_info = getattr(model, "feature_info", None)
    infos = feature_info if isinstance(feature_info, list) else []
    model.default_feature_layers = [info["module"] for info in infos if info.get("module") in paths]
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _replace_head(model: nn.Module, name: str, old_classes: int, num_classes: int) -> None:
    """Swap the last Linear (or 1x1 conv, for SqueezeNet) with ``old_classes`` outputs for a fresh one."""
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear) and module.out_features == old_classes:
            _set_submodule(model, path, nn.Linear(module.in_features, num_classes, bias=module.bias is not None))
            return
        if isinstance(module, nn.Conv2d) and module.out_channels == old_classes:
            head = nn.Conv2d(module.in_channels, num_classes, module.kernel_size, bias=module.bias is not None)
            _set_submodule(model, path, head)
            return
    raise KdrunError(
        f"cannot find the {old_classes}-class head of torchvision model '{name}' to resize it; "
        "use it with pretrained set to false"
    )


def _adapt_first_conv(model: nn.Module, name: str, in_chans: int, pretrained: bool) -> None:
    """Replace the first Conv2d (``conv1`` for ResNets) with one taking ``in_chans`` channels.

    A pretrained model given one channel starts from the sum of the RGB filters; otherwise the new
    convolution keeps PyTorch's default initialisation.
    """
    found = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise KdrunError(f"torchvision model '{name}' has no Conv2d to adapt to in_chans={in_chans}; use 3 channels")
    path, old = found
    if old.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    if pretrained and in_chans == 1:
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    _set_submodule(model, path, new)


# ---- transfer: a model's classifier, starting weights from a file, frozen parts ---------------------------
BACKBONE = "backbone"  # student.freeze=[backbone]: every parameter outside the classifier (a linear probe)


def classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The model's classifier, as (module path, module): what timm's `get_classifier()` returns where the model
    has it, else the last nn.Linear the model registers. One sentence when it has neither."""
    modules = list(model.named_modules())
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        found = next((path for path, m in modules if m is head and path), None)
        if found is not None and next(head.parameters(), None) is not None:
            return found, head
    found = next(((path, m) for path, m in reversed(modules) if isinstance(m, nn.Linear)), None)
    if found is None:
        raise KdrunError(f"{type(model).__name__} has no nn.Linear classifier, so its head cannot be found; give it "
                         "one, or load weights of the same class count")
    return found


def _under(name: str, prefix: str) -> bool:
    """Whether the parameter or module `name` is `prefix` or lies inside it (module paths, dot-separated)."""
    return name == prefix or name.startswith(prefix + ".")


def init_state(path, field: str) -> dict[str, torch.Tensor]:
    """The weights in `path`: a kdrun checkpoint's `model` entry (best.pt, last.pt, a cached teacher.pt) or a
    plain state_dict; one sentence naming `field` when the file is missing, unreadable or holds none."""
    from kdrun import checkpoint

    try:
        ckpt = checkpoint.load(path)
    except KdrunError as e:
        raise KdrunError(f"{field}={path}: {e}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdrunError(f"{field}={path} holds no state_dict; give a checkpoint a kdrun run wrote "
                         "(<run dir>/checkpoints/best.pt) or a file written by torch.save(model.state_dict())")
    return state


def load_init(model: nn.Module, path, field: str = "student.init") -> list[str]:
    """Start `model` from the weights in `path` (see `init_state`): every tensor whose name and shape match is
    loaded; the classifier (`classifier`) keeps its fresh initialisation where its shapes differ (a new head for
    another class count). Any other missing, unexpected or mismatched tensor is one sentence naming the file, the
    tensors and the fix. Returns the names of the tensors left fresh."""
    state = init_state(path, field)
    mine = model.state_dict()
    head, _ = classifier(model)
    fresh = [k for k, v in state.items() if k in mine and v.shape != mine[k].shape and _under(k, head)]
    problems = [f"{k} {tuple(v.shape)} in the file vs {tuple(mine[k].shape)} here" for k, v in state.items()
                if k in mine and v.shape != mine[k].shape and k not in fresh]
    problems += [f"{k} missing from the file" for k in mine if k not in state]
    problems += [f"{k} not in this model" for k in state if k not in mine]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise KdrunError(f"{field}={path} does not fit this {type(model).__name__} ({'; '.join(problems[:3])}{more}); "
                         f"give {field.split('.')[0]} the architecture the file was saved from (its name and kwargs), "
                         "only the classifier may differ")
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def freeze(model: nn.Module, prefixes, field: str = "student.freeze") -> list[str]:
    """Freeze the parts of `model` under `prefixes` (module paths of `dict(model.named_modules())`, or parameter
    names; `backbone`: every parameter outside the classifier): their parameters stop requiring gradients, and
    `model.frozen_prefixes` records them, so that `kdrun.methods.base.Method.train` keeps their BatchNorm layers
    in eval mode (`keep_frozen_eval`). Returns the resolved prefixes; an unknown one is one sentence."""
    prefixes = list(prefixes or ())
    if not prefixes:
        return []
    modules = dict(model.named_modules())
    names = dict(model.named_parameters())
    resolved = []
    for prefix in prefixes:
        if prefix == BACKBONE:
            resolved += _outside(model, classifier(model)[0])
        elif prefix and (prefix in modules or prefix in names):
            resolved.append(prefix)
        else:
            top = [n for n, m in model.named_children() if next(m.parameters(), None) is not None]
            raise KdrunError(f"{field} names '{prefix}', which is not a module of the {type(model).__name__}; give "
                             f"module paths such as its top-level modules {', '.join(top)} (or {BACKBONE}: all but "
                             "the classifier)")
    for name, p in names.items():
        if any(_under(name, prefix) for prefix in resolved):
            p.requires_grad_(False)
    model.frozen_prefixes = tuple(dict.fromkeys(resolved))
    keep_frozen_eval(model)
    return list(model.frozen_prefixes)


def _outside(model: nn.Module, head: str, prefix: str = "") -> list[str]:
    """The fewest module paths and parameter names that cover every parameter of `model` outside `head`."""
    out = [prefix + n for n, _ in model.named_parameters(recurse=False)]  # e.g. a ViT's cls_token
    for name, child in model.named_children():
        path = prefix + name
        if _under(head, path) and path != head:
            out += _outside(child, head, path + ".")
        elif path != head and next(child.parameters(), None) is not None:
            out.append(path)
    return out


def keep_frozen_eval(root: nn.Module) -> None:
    """Put the BatchNorm layers of every frozen part (`freeze`) of the models inside `root` in eval mode, so their
    running statistics never move, whatever `.train()` did."""
    for model in root.modules():
        prefixes = getattr(model, "frozen_prefixes", ())
        for path, module in model.named_modules() if prefixes else ():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(_under(path, p) for p in prefixes):
                module.eval()


def depth_groups(model: nn.Module) -> dict[str, int]:
    """Each parameter name of `model` -> its depth, the classifier deepest: timm's `group_matcher` layers where
    the model has one, else the order of its top-level children (parameters of the model itself with the first)
    with the classifier's child last. For layer-wise learning-rate decay (`schedule.layer_decay`)."""
    if callable(getattr(model, "group_matcher", None)):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=False))
        return {name: depth for depth, (_, names) in enumerate(sorted(groups.items())) for name in names}
    head, _ = classifier(model)
    children = [n for n, m in model.named_children() if not _under(head, n) and next(m.parameters(), None) is not None]
    order = {child: i for i, child in enumerate(children)}
    last = len(children)
    return {name: last if _under(name, head.split(".")[0]) else order.get(name.split(".")[0], 0)
            for name, _ in model.named_parameters()}
