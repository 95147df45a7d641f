"""`kdrun-export ckpt_path=RUN/checkpoints/best.pt format=onnx|torchscript|safetensors [output=PATH]`: the
checkpoint's model as one file, beside the checkpoint unless `output` says where, with its preprocessing stored in
it (`metadata`: ONNX metadata_props, a TorchScript extra file `kdrun.json`, safetensors metadata).

The ONNX and TorchScript files take a float32 batch (N, in_chans, image_size, image_size) of pixels scaled to
[0, 1] and normalised with the stored mean and std, and return the logits; N is free, the image size is fixed.
Each file is checked before it is kept: it must give the checkpoint's logits on a random batch.
"""

import copy
import json
import logging
import math
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdrun.tools import atomic, fail

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript", "safetensors": ".safetensors"}
TOLERANCE = 1e-4  # the largest difference from the checkpoint's logits an exported file may have


@hydra.main(version_base="1.3", config_path="pkg://kdrun.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """The `kdrun-export` command."""
    from kdrun.errors import KdrunError

    try:
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise KdrunError("no checkpoint given; name one with ckpt_path=RUN/checkpoints/best.pt")
        path, diff = export(cfg.ckpt_path, cfg.format, cfg.get("output"))
    except KdrunError as e:
        fail("kdrun-export", e)
    print(f"kdrun-export: wrote {path} ({cfg.format}; its logits differ from the checkpoint's by at most "
          f"{diff:.1e} on a random batch)")


def export(ckpt_path, fmt: str, output=None) -> tuple[Path, float]:
    """Write the model of the checkpoint `ckpt_path` as `fmt` to `output` (default: beside the checkpoint); returns
    the path and the largest difference of the file's logits from the checkpoint's on a random batch."""
    from kdrun import checkpoint
    from kdrun.errors import KdrunError

    if fmt not in SUFFIXES:
        raise KdrunError(f"format={fmt} is not an export format; use format=onnx, torchscript or safetensors")
    path = Path(ckpt_path).expanduser()
    model, ckpt = checkpoint.load_model(path)
    arch = ckpt["arch"]
    if any(arch.get(k) is None for k in ("image_size", "mean", "std")):
        raise KdrunError(f"{path} does not record its preprocessing (image size, mean, std): it was written by an "
                         "older kdrun; train the run again to export it")
    out = Path(output).expanduser() if output else path.with_suffix(SUFFIXES[fmt])
    shape = (arch["in_chans"], arch["image_size"], arch["image_size"])
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    with atomic(out) as tmp:
        logits = {"onnx": to_onnx, "torchscript": to_torchscript, "safetensors": to_safetensors}[fmt](
            model, shape, tmp, metadata(arch), x)
        diff = (logits - expected).abs().max().item()
        if not diff <= TOLERANCE:
            raise KdrunError(f"the {fmt} export of {path} gives logits {diff:.1e} away from the checkpoint's; "
                             "export it in another format")
    return out, diff


def metadata(arch: dict) -> dict[str, str]:
    """The preprocessing and origin of a model, as string pairs (what ONNX and safetensors metadata hold)."""
    meta = {
        "kdrun.input": "float32 NCHW: pixels scaled to [0, 1], minus mean, divided by std, per channel",
        "kdrun.mean": json.dumps(arch["mean"]), "kdrun.std": json.dumps(arch["std"]),
        "kdrun.image_size": str(arch["image_size"]), "kdrun.in_chans": str(arch["in_chans"]),
        "kdrun.num_classes": str(arch["num_classes"]), "kdrun.dataset": str(arch.get("dataset")),
        "kdrun.arch": json.dumps(arch),
    }
    if arch.get("classes") is not None:
        meta["kdrun.classes"] = json.dumps(arch["classes"])
    return meta


def _missing(package: str) -> Exception:
    from kdrun.errors import KdrunError

    return KdrunError(f"exporting needs {package}, which is not installed; pip install 'kdrun[export]'")


def to_onnx(model: nn.Module, shape, path: Path, meta: dict[str, str], x: torch.Tensor) -> torch.Tensor:
    """Write `model` as ONNX (a free batch size, the image size fixed); returns its logits for `x` under
    onnxruntime."""
    from kdrun.errors import KdrunError

    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise _missing(e.name) from None
    for name in ("onnxscript", "onnx_ir"):  # their optimiser passes log every step at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    model = exportable(model, shape)
    example = torch.zeros(2, *shape)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as e:
        raise KdrunError(f"torch cannot export this model to ONNX ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "export it with format=torchscript or safetensors") from e
    program.model.metadata_props.update(meta)
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def to_torchscript(model: nn.Module, shape, path: Path, meta: dict[str, str], x: torch.Tensor) -> torch.Tensor:
    """Write `model` traced to TorchScript, the metadata as the extra file `kdrun.json`; returns its logits for
    `x` under torch.jit.load."""
    from kdrun.errors import KdrunError

    with warnings.catch_warnings():  # torch.jit is deprecated, yet TorchScript is what C++/mobile runtimes load
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model, torch.zeros(2, *shape))
        except Exception as e:
            raise KdrunError(f"torch cannot trace this model ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "export it with format=onnx or safetensors") from e
        torch.jit.save(traced, str(path), _extra_files={"kdrun.json": json.dumps(meta)})
        with torch.no_grad():
            return torch.jit.load(str(path)).eval()(x)


def to_safetensors(model: nn.Module, shape, path: Path, meta: dict[str, str], x: torch.Tensor) -> torch.Tensor:
    """Write `model`'s weights as safetensors, the metadata beside them; returns the logits for `x` of a model
    rebuilt from the file alone (its `kdrun.arch` metadata and weights)."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_model, save_model
    except ImportError:
        raise _missing("safetensors") from None
    from kdrun import models

    save_model(model, str(path), metadata=meta)
    path.chmod(0o644)  # safetensors creates it readable by its owner alone
    with safe_open(str(path), "pt") as f:
        rebuilt = models.from_arch(json.loads(f.metadata()["kdrun.arch"]))
    load_model(rebuilt, str(path))
    with torch.no_grad():
        return rebuilt.eval()(x)


class WindowPool(nn.Module):
    """`nn.AdaptiveMaxPool2d` or `nn.AdaptiveAvgPool2d` at one input size, written out as its pooling windows
    (the same numbers), in operations every ONNX exporter supports: adaptive pooling whose output size does not
    divide its input size (kdrun's `cnn`: 7x7 to 3x3) has no ONNX operator."""

    def __init__(self, kind: str, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.kind = kind
        self.windows = [[(math.floor(i * n / o), math.ceil((i + 1) * n / o)) for i in range(o)]
                        for n, o in zip(in_size, out_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def pool(w):
            return w.amax((2, 3)) if self.kind == "max" else w.mean((2, 3))

        rows = [torch.stack([pool(x[:, :, a:b, c:d]) for c, d in self.windows[1]], -1) for a, b in self.windows[0]]
        return torch.stack(rows, -2)


def exportable(model: nn.Module, shape) -> nn.Module:
    """A copy of `model` whose adaptive 2-d poolings (other than global ones) are `WindowPool`s for input images
    of `shape` (C, H, W)."""
    model = copy.deepcopy(model).eval()
    sizes, handles = {}, []

    def record(name):
        def hook(module, args, out):
            sizes[name] = tuple(args[0].shape[-2:]), tuple(out.shape[-2:])
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for handle in handles:
            handle.remove()
    for name, (in_size, out_size) in sizes.items():
        if out_size != (1, 1):
            kind = "max" if isinstance(model.get_submodule(name), nn.AdaptiveMaxPool2d) else "avg"
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, WindowPool(kind, in_size, out_size))
    return model


if __name__ == "__main__":
    main()
