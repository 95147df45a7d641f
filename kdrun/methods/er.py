"""Experience replay (ER): a small memory of past images, replayed beside each new batch.

Chaudhry et al. (2019), "On Tiny Episodic Memories in Continual Learning", as Mammoth's `er` implements it: per
step, a batch of up to `replay_batch_size` images (default: the current batch's size; all of the memory when it
holds fewer) is drawn from the memory without replacement, concatenated to the current batch, and the student takes
one step on the cross-entropy over the concatenation (one mean over current and replayed images, as both
references compute it). The loss is over all the student's logits, as Mammoth's class-incremental ER trains (no
"active head"). The memory holds `memory_size` images, filled by `policy`:

- `reservoir` (Chaudhry et al., Mammoth): reservoir sampling (Vitter's algorithm R) over the stream of training
  images: the n-th image seen is stored while the memory has room, else it replaces the slot drawn uniformly from
  0..n-1 when that slot is below `memory_size`, so every image of the stream is held with probability
  memory_size / n. An image enters after the step it was trained in (Mammoth's order). The images are stored as
  the training batches carry them (augmented and normalised; Mammoth keeps the un-augmented images and augments
  the replayed ones, which kdrun's batches do not expose to a method).
- `balanced`: at the end of each experience every class seen so far keeps memory_size // (classes seen) images:
  an old class keeps the first of its stored images (a random subset, as they were drawn at random), a new class
  gets that many of the experience's images (un-augmented, normalised), drawn at random.

The memory (images, labels) is a pair of buffers allocated in `setup` with the dataset's image shape, and its
count, the stream's length and the generator of every random draw are the method's extra state, so a checkpoint
holds them and a resumed run replays exactly what the uninterrupted run would have.
"""

import torch
import torch.nn.functional as F

from kdrun.errors import KdrunError
from kdrun.methods.base import Method, accuracy

POLICIES = ("reservoir", "balanced")


def reservoir(seen: int, n: int, capacity: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Reservoir sampling of a batch of `n` stream items after `seen` earlier ones, into a memory of `capacity`
    slots: (slots, items), the memory slots written and the batch positions written to them. Item j (the stream's
    (seen + j + 1)-th) takes slot seen + j while there is room, else a slot drawn uniformly from 0..seen + j, kept
    when it is below `capacity`; items of one batch drawing the same slot are taken in order (the last stays)."""
    position = torch.arange(seen, seen + n, dtype=torch.float64)
    drawn = (torch.rand(n, generator=generator, dtype=torch.float64) * (position + 1)).long()
    slot = torch.where(position < capacity, position.long(), drawn)
    kept = torch.nonzero(slot < capacity).squeeze(1)
    owner = torch.full((capacity,), -1, dtype=torch.long).scatter_reduce(0, slot[kept], kept, "amax")
    slots = torch.nonzero(owner >= 0).squeeze(1)
    return slots, owner[slots]


class ER(Method):
    ranges = {"memory_size": "[1, inf)", "policy": "{reservoir, balanced}", "replay_batch_size": "[1, inf)"}

    def __init__(self, student, teacher=None, memory_size: int = 200, policy: str = "reservoir",
                 replay_batch_size: int | None = None, seed: int = 0):
        super().__init__(student)
        if policy not in POLICIES:
            raise KdrunError(f"method.policy={policy}; use reservoir or balanced")
        self.memory_size, self.policy, self.replay_batch_size = memory_size, policy, replay_batch_size
        self.count = 0  # images in the memory (its first `count` slots)
        self.seen = 0  # images of the training stream so far (reservoir)
        self.generator = torch.Generator().manual_seed(seed)  # the memory's and the replay's draws

    def setup(self, data):
        if self.policy == "balanced" and self.memory_size < data.num_classes:
            raise KdrunError(f"method.memory_size={self.memory_size} cannot hold one image of each of "
                             f"{data.name}'s {data.num_classes} classes (policy=balanced); give at least "
                             f"{data.num_classes}, or policy=reservoir")
        shape = (self.memory_size, data.in_chans, data.image_size, data.image_size)
        self.register_buffer("memory_images", torch.zeros(shape))
        self.register_buffer("memory_labels", torch.zeros(self.memory_size, dtype=torch.long))

    def on_stage_start(self, stage, loop):
        if "experience" not in stage.info:
            raise KdrunError("method=er replays earlier experiences of a continual scenario; run it with "
                             "scenario=split")

    def step(self, batch, loop):
        x, y = batch["image"], batch["label"]
        n = len(y)
        if self.count:
            k = min(self.replay_batch_size or n, self.count)
            pick = torch.randperm(self.count, generator=self.generator)[:k].to(x.device)
            x = torch.cat([x, self.memory_images.index_select(0, pick).to(x.dtype)])
            y = torch.cat([y, self.memory_labels.index_select(0, pick)])
        with loop.autocast():
            logits = self.student(x)
            ce = F.cross_entropy(logits, y)
        loop.optimize(ce)
        if self.policy == "reservoir":
            self.add(batch["image"], batch["label"])
        return {"ce": ce}, {"acc": accuracy(logits[:n], y[:n])}

    @torch.no_grad()
    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer a batch of the stream to the reservoir."""
        slots, items = reservoir(self.seen, len(labels), self.memory_size, self.generator)
        slots, items = slots.to(images.device), items.to(images.device)
        self.memory_images[slots] = images.index_select(0, items).to(self.memory_images.dtype)
        self.memory_labels[slots] = labels.index_select(0, items)
        self.seen += len(labels)
        self.count = min(self.seen, self.memory_size)

    def on_stage_end(self, stage, loop):
        if self.policy == "balanced":
            self.rebalance(stage.info["classes"], stage.info["seen"], loop.batches("train", classes=stage.info["classes"]))

    @torch.no_grad()
    def rebalance(self, classes, seen, batches) -> None:
        """The balanced memory after an experience of `classes` (with `seen`, the classes so far): memory_size //
        len(seen) images per class, the old classes' from the memory, the new ones' drawn from `batches` (the
        experience's plain training batches)."""
        per_class = self.memory_size // len(seen)
        parts = list(batches)
        new_images = torch.cat([b["image"] for b in parts])
        new_labels = torch.cat([b["label"] for b in parts])
        labels = self.memory_labels[:self.count]
        images, kept = [], []
        for c in seen:
            if c in classes:
                members = torch.nonzero(new_labels == c).squeeze(1)
                members = members[torch.randperm(len(members), generator=self.generator)[:per_class].to(members.device)]
                images.append(new_images.index_select(0, members))
            else:
                members = torch.nonzero(labels == c).squeeze(1)[:per_class]
                images.append(self.memory_images.index_select(0, members))
            kept.append(torch.full((len(members),), c, dtype=torch.long, device=labels.device))
        images, kept = torch.cat(images), torch.cat(kept)
        self.count = len(kept)
        self.memory_images[:self.count] = images.to(self.memory_images.dtype)
        self.memory_labels[:self.count] = kept

    def get_extra_state(self):
        return {"count": self.count, "seen": self.seen, "generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.count, self.seen = state["count"], state["seen"]
        self.generator.set_state(state["generator"])
