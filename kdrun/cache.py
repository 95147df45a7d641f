"""The teacher-output cache: the teacher's logits on the training images, computed once and reused by every
later run and sweep job, for methods whose teacher input does not depend on the step's random draw.

Two view recipes are cacheable: the clean (un-augmented) image (a fixed teacher view, or any view of a
dataset trained without augmentation or mixup), and a stored set of K augmented views per image
(`kdrun.data.StoredViews`: crop offsets, flip, mixup partner and coefficient, recorded in the file beside
the teacher's outputs). The run hands the cache to the method and to the loader factory;
`Method.teacher_outputs` then reads it by `batch["index"]` (and `batch["view"]`) instead of running the
teacher, so methods do not know whether a cache is in use.

A cache file is `paths.cache_dir/logits/<key>.pt`, the key a hash of the teacher's weights, the training split
(its content and normalisation) and the view recipe. It is used only when it is readable, records exactly
those fields, has the expected shapes and matches its checksum; otherwise kdrun says why and rebuilds it.
"""

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from kdrun import checkpoint, data as kdata
from kdrun.data.loaders import FolderLoader, Normalize, StoredViews
from kdrun.data.sources import InMemory
from kdrun.errors import KdrunError
from kdrun.methods.base import Method
from kdrun.models.inputs import Renormalize

log = logging.getLogger(__name__)

FORMAT = 1
PROGRESS_EVERY_S = 10.0  # a progress line at most this often while the teacher's outputs are computed


class TeacherCache:
    """Cached teacher outputs, (N, ...) for the clean view or (N, K, ...) for K `stored` views per image (the
    loaders then draw the teacher's view among those)."""

    def __init__(self, logits: torch.Tensor, stored: StoredViews | None = None):
        self.logits = logits
        self.stored = stored

    def lookup(self, batch: dict) -> torch.Tensor:
        if self.stored is not None:
            return self.logits[batch["index"], batch["view"]]
        return self.logits[batch["index"]]


def teacher_cache(method: Method, data: kdata.Data, cfg: DictConfig, device,
                  views_change: bool = False) -> TeacherCache | None:
    """The cached outputs of `method`'s teacher on the training set, read from `paths.cache_dir` or built there
    first, when `teacher.cache=true`; with `auto` (the default), only when the method reads nothing but the
    teacher's logits and the teacher sees clean images (no stored views); else None. `views_change`: the training
    views change over the run (a curriculum's), so only a clean teacher view can be cached."""
    spec = method.batch_spec
    mode = cfg.teacher.get("cache")
    if method.teacher is None or not mode:
        return None
    in_memory = isinstance(data.splits.train, InMemory)
    # without augmentation or mixup, the teacher's view of an in-memory image is the clean image itself
    clean = spec.teacher_view == "clean" or (in_memory and not kdata.train_augment(data) and not spec.mixup_alpha
                                             and not views_change)
    if mode == "auto" and not (spec.cacheable and clean):
        return None  # auto: only where the cache gives exactly the teacher's outputs of every step
    if mode not in (True, "auto"):
        raise KdrunError(f"teacher.cache={mode}; use auto, true or false")
    if not spec.cacheable:
        raise KdrunError(f"{type(method).__name__} uses more of the teacher than its logits, which the teacher "
                         "cache does not hold; set teacher.cache=false (or auto)")
    stored = None
    if not clean:
        if views_change:
            raise KdrunError("teacher.cache=true stores the teacher's outputs on fixed views of the images, and the "
                             "curriculum changes the training views every epoch; set teacher.cache=auto or false")
        if not in_memory:
            raise KdrunError(f"{data.name} is read from files, and stored augmented views (teacher.cache with a method "
                             "whose teacher sees augmented images) need an in-memory dataset; set teacher.cache=false")
        k = int(cfg.teacher.cache_views)
        if k < 1:
            raise KdrunError(f"teacher.cache_views={k}; give the number of stored views per image (>= 1)")
        stored = StoredViews.draw(len(data.splits.train), k, kdata.train_augment(data), spec.mixup_alpha)
    teacher = method.cached_teacher()
    fields = cache_fields(teacher, data, stored)
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.paths.cache_dir).expanduser() / "logits" / f"{key}.pt"
    n, k = len(data.splits.train), stored.k if stored is not None else None
    shape = (n, *(() if k is None else (k,)), *output_shape(teacher, data, device))
    saved = read(path, fields, shape)
    if saved is not None:
        log.info("teacher cache: reusing %s (%s); the teacher does not run", path, _what(n, k))
        logits, stored = saved
    else:
        log.info("teacher cache: computing the teacher's outputs on %s into %s", _what(n, k), path)
        logits = compute(teacher, data, stored, device, cfg.trainer.eval_batch_size, shape[1 + (k is not None):])
        write(path, fields, logits, stored)
    return TeacherCache(logits.to(device), stored)


def cache_fields(teacher: torch.nn.Module, data: kdata.Data, stored: StoredViews | None) -> dict:
    """Everything the cached outputs depend on, as plain data (hashed into the key, recorded in the file)."""
    if stored is None:
        view = {"teacher": "clean"}
    else:
        augment = kdata.train_augment(data)
        view = {"teacher": "stored", "views": stored.k, "crop_padding": augment.crop_padding, "flip": augment.flip,
                "mixup_alpha": stored.mixup_alpha}
    fields = {"format": FORMAT, "teacher": tensor_hash(teacher.state_dict()),
              "dataset": {"name": data.name, "train": split_hash(data), "mean": list(data.mean), "std": list(data.std)},
              "view": view}
    own = [m.own for m in teacher.modules() if isinstance(m, Renormalize)]
    if own:  # teacher.normalize: the same weights fed other inputs (absent otherwise, so older files keep their key)
        fields["teacher_input"] = own
    return fields


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_hash(data: kdata.Data) -> str:
    """The training split's fingerprint: its tensors, or for a folder dataset its file list and image size."""
    train = data.splits.train
    if isinstance(train, InMemory):
        return tensor_hash({"images": train.images, "labels": train.labels})
    samples = _samples(train)
    if samples is None:
        raise KdrunError(f"{data.name}'s training split lists no files to fingerprint; set teacher.cache=false")
    what = {"samples": [[str(p), int(c)] for p, c in samples], "size": data.image_size,
            "test_resize_ratio": data.augment.get("test_resize_ratio", 1.0), "in_chans": data.in_chans}
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _samples(part) -> list | None:
    """The (path, class) files a folder split holds, in its order, through the Subsets a validation or labeled
    split makes of it; None for a split that is not read from files."""
    if isinstance(part, torch.utils.data.Subset):
        inner = _samples(part.dataset)
        return None if inner is None else [inner[i] for i in part.indices]
    return getattr(part, "samples", None)


def read(path: Path, fields: dict, shape: tuple) -> tuple[torch.Tensor, StoredViews | None] | None:
    """The cached logits and stored views at `path`, or None (with the reason logged) if it cannot be used."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        problem = _problem(saved, fields, shape)
    except Exception as e:  # truncated, overwritten, not a torch file...
        problem = f"is corrupt ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    if problem:
        log.warning("teacher cache: %s %s; rebuilding it", path, problem)
        return None
    stored = saved["stored"]
    views = StoredViews(*(stored[f] for f in StoredViews.FIELDS), fields["view"]["mixup_alpha"]) if stored else None
    return saved["logits"], views


def _problem(saved, fields: dict, shape: tuple) -> str | None:
    if not isinstance(saved, dict) or not {"fields", "logits", "stored", "checksum"} <= set(saved):
        return "is not a kdrun teacher cache"
    if saved["fields"] != fields:
        diff = sorted(k for k in fields if saved["fields"].get(k) != fields[k])
        return f"was made for another {' and '.join(diff) or 'format'} (stale)"
    if tuple(saved["logits"].shape) != shape:
        return f"holds logits of shape {tuple(saved['logits'].shape)}, not {shape}"
    stored = saved["stored"]
    if (stored is None) != (len(shape) == 2):
        return "holds views that do not fit its logits"
    if stored and any(stored[f].shape[:2] != shape[:2] for f in StoredViews.FIELDS):
        return "holds views that do not fit its logits"
    if _checksum(saved["logits"], stored) != saved["checksum"]:
        return "fails its checksum"
    return None


def _checksum(logits: torch.Tensor, stored: dict | None) -> str:
    return tensor_hash({"logits": logits, **(stored or {})})


def write(path: Path, fields: dict, logits: torch.Tensor, stored: StoredViews | None) -> None:
    state = stored.state() if stored is not None else None
    checkpoint.save({"fields": fields, "logits": logits, "stored": state, "checksum": _checksum(logits, state)}, path)


@torch.inference_mode()
def output_shape(teacher: torch.nn.Module, data: kdata.Data, device) -> tuple[int, ...]:
    """The shape of the teacher's output for one image (its logits: (num_classes,))."""
    was_training = teacher.training
    out = teacher.eval()(torch.zeros(1, data.in_chans, data.image_size, data.image_size, device=device))
    teacher.train(was_training)
    return tuple(out.shape[1:])


@torch.inference_mode()
def compute(teacher: torch.nn.Module, data: kdata.Data, stored: StoredViews | None, device,
            batch_size: int, per_image: tuple[int, ...]) -> torch.Tensor:
    """The teacher's outputs of shape `per_image` (float32, on the CPU) on every training image: clean, or
    each stored view."""
    was_training = teacher.training
    teacher.eval()
    normalize = Normalize(data.mean, data.std, device)
    train = data.splits.train
    n = len(train)
    if isinstance(train, InMemory):
        images = train.images.to(device)
        augment = kdata.train_augment(data) or None
        views = stored.to(device) if stored is not None else None
        out = torch.empty(n, *(() if stored is None else (stored.k,)), *per_image)
        chunks = [(v, idx) for v in range(views.k if views else 1)
                  for idx in torch.arange(n, device=device).split(batch_size)]
        progress = _progress(len(chunks))
        for v, idx in tqdm(chunks, desc="teacher cache", disable=None, leave=False):
            if views is None:
                out[idx.cpu()] = teacher(normalize(images.index_select(0, idx))).float().cpu()
            else:
                x = views.render(images, idx, torch.full_like(idx, v), augment, normalize)
                out[idx.cpu(), v] = teacher(x).float().cpu()
            progress()
    else:
        _, test_tf = kdata.folder_transforms(data)
        out = torch.empty(n, *per_image)
        loader = FolderLoader(train, test_tf, batch_size, normalize, device)
        progress = _progress(len(loader))
        for batch in tqdm(loader, desc="teacher cache", disable=None, leave=False):
            out[batch["index"].cpu()] = teacher(batch["image"]).float().cpu()
            progress()
    teacher.train(was_training)
    return out


def _progress(total: int):
    """A function to call after each of `total` batches: it logs how far the computation is at most every
    PROGRESS_EVERY_S seconds (tqdm's bar shows on a terminal only), and the time taken after the last batch."""
    start = last = time.perf_counter()
    done = 0

    def step() -> None:
        nonlocal done, last
        done, now = done + 1, time.perf_counter()
        if done == total:
            log.info("teacher cache: %d batches computed in %.1f s", total, now - start)
        elif now - last >= PROGRESS_EVERY_S:
            log.info("teacher cache: %d/%d batches (%.0f%%), %.0f s", done, total, 100 * done / total, now - start)
            last = now

    return step


def _what(n: int, k: int | None) -> str:
    return f"{n} training images, clean" if k is None else f"{n} training images x {k} stored views"
