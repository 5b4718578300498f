"""Streaming frames of a subject for training and evaluation.

Frames stay uint8 on the host (decoded lazily, optionally kept in a bounded
uint8 cache) and are converted to float only on the training device, one
batch at a time: nothing holds a whole dataset as float32 on the accelerator.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from headavatar.errors import UserError
from headavatar.subjects.format import HEAD_LABELS, MOUTH_LABELS, Subject


def training_size(subject: Subject, resolution: int | None) -> tuple[int, int]:
    """(H, W) to train/evaluate at: the subject's size, or scaled so the long side is ``resolution``."""
    H, W = subject.height, subject.width
    if not resolution:
        return H, W
    if resolution < 16:
        raise UserError(f"--resolution {resolution} is too small (minimum 16)")
    s = resolution / max(H, W)
    return max(1, round(H * s)), max(1, round(W * s))


class FrameDataset(torch.utils.data.Dataset):
    """Items: {"index", "image" [H,W,3] u8, "alpha" [H,W] u8, "parsing" [H,W] u8} at ``resolution``."""

    def __init__(self, subject: Subject, indices, resolution: tuple[int, int] | None = None, cache_bytes: int = 512 << 20):
        self.subject = subject
        self.indices = [int(i) for i in indices]
        self.size = resolution or (subject.height, subject.width)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        item = self._cache.get(i)
        if item is None:
            item = self._load(i)
            nbytes = sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
            if self._cached + nbytes <= self.cache_bytes:
                self._cache[i] = item
                self._cached += nbytes
        return item

    def __getstate__(self):  # sent to spawned loader workers: without the parent's decoded frames
        return {**self.__dict__, "_cache": OrderedDict(), "_cached": 0}

    def clear_cache(self) -> None:
        """Drop the decoded host copies (e.g. once they live on the accelerator)."""
        self._cache.clear()
        self._cached = 0

    def _load(self, i: int) -> dict:
        f = self.subject.load_frame(i)
        H, W = self.size
        if (H, W) != f["image"].shape[:2]:
            f = {
                "image": _resize(f["image"], (H, W), Image.BILINEAR),
                "alpha": _resize(f["alpha"], (H, W), Image.BILINEAR),
                "parsing": _resize(f["parsing"], (H, W), Image.NEAREST),
            }
        return {"index": i, **{k: torch.from_numpy(np.array(v, copy=True)) for k, v in f.items()}}


def _resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    H, W = size
    if resample != Image.NEAREST and (a.shape[0] > 2 * H):
        resample = Image.BOX  # area filter when shrinking a lot, to avoid aliasing
    return np.asarray(Image.fromarray(a).resize((W, H), resample))


def collate(items: list[dict]) -> dict:
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "image": torch.stack([it["image"] for it in items]),
        "alpha": torch.stack([it["alpha"] for it in items]),
        "parsing": torch.stack([it["parsing"] for it in items]),
    }


def prepare_targets(batch: dict, background: torch.Tensor, device) -> dict:
    """uint8 batch -> float targets on ``device``.

    gt = img*alpha + bg*(1-alpha), then gt*M_head + bg*(1-M_head) (FlashAvatar's
    compositing: hair and neck kept, clothes and shoulders dropped).
    """
    img = batch["image"].to(device, non_blocking=True).float() / 255.0  # [B,H,W,3]
    alpha = batch["alpha"].to(device, non_blocking=True).float()[..., None] / 255.0
    parsing = batch["parsing"].to(device, non_blocking=True)
    head = torch.zeros_like(parsing, dtype=torch.bool)
    for lab in HEAD_LABELS:
        head |= parsing == lab
    mouth = torch.zeros_like(head)
    for lab in MOUTH_LABELS:
        mouth |= parsing == lab
    head = head.float()[..., None]
    bg = background.to(device).view(1, 1, 1, 3)
    gt = img * alpha + bg * (1 - alpha)
    gt = gt * head + bg * (1 - head)
    return {"gt": gt, "alpha": alpha * head, "head_mask": head, "mouth_mask": mouth.float()[..., None], "index": batch["index"]}


class InfiniteSampler(torch.utils.data.Sampler):
    """Reshuffles every pass (seeded by pass number, so a resumed run sees the same order); at most ``per_pass`` frames a pass."""

    def __init__(self, n: int, seed: int = 0, per_pass: int | None = None, start: int = 0):
        self.n, self.seed, self.per_pass, self.start = n, seed, per_pass or n, start

    def __iter__(self):
        count = 0
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(self.n, generator=g)[: self.per_pass].tolist()
            for k in order:
                if count >= self.start:
                    yield k
                count += 1
            epoch += 1


HOST_RESIDENT_MB = 8192  # compact subjects up to this size (uint8, at the training size) are decoded once into host memory


def frame_bytes(size: tuple[int, int]) -> int:
    """uint8 bytes of one training frame (RGB + alpha + parsing) at ``size``."""
    return size[0] * size[1] * 5


def training_stream(subject: Subject, indices, size: tuple[int, int], batch_size: int, seed: int, frames_per_pass: int,
                    num_workers: int, cache_mb: int, start_step: int, device: torch.device, device_cache_mb: int = 0):
    """(dataset, iterator of collated uint8 batches) for a training loop resumed at ``start_step``.

    When all training frames fit in ``device_cache_mb`` (uint8) they are decoded once and kept on
    ``device``; batches are then gathered there, with no loader in the loop.  Otherwise worker
    processes decode and prefetch, and pinned memory on CUDA lets the copy overlap compute.  Either
    way the batches come in the same order (one seeded sampler), and device memory is bounded by
    ``device_cache_mb``, whatever the number of frames.
    """
    data = FrameDataset(subject, indices, size, cache_bytes=cache_mb << 20)
    sampler = InfiniteSampler(len(data), seed=seed, per_pass=min(frames_per_pass, len(data)), start=start_step * batch_size)
    if device_cache_mb > 0 and len(data) * frame_bytes(size) <= device_cache_mb << 20:
        return data, _resident_batches(data, sampler, batch_size, num_workers, device)
    if subject.chunked and len(data) * frame_bytes(size) <= HOST_RESIDENT_MB << 20:
        # compact subjects decode a whole 16-frame chunk per random read (~10x a JPEG): decode them
        # once, in order, into host memory and gather batches there instead
        return data, _resident_batches(data, sampler, batch_size, num_workers, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context=worker_context(data.subject, num_workers),
    )
    return data, iter(loader)


def worker_context(subject: Subject, num_workers: int) -> str | None:
    """How loader workers start: spawned for compact subjects, else the platform's default.

    A forked worker inherits the parent's FFmpeg state, and the parent has decoded chunks by then
    (initialisation, held-out frames): with PyAV 19 on a 16-core GPU machine a forked worker hung
    in its first decode, every time, and training never began."""
    return "spawn" if num_workers > 0 and subject.chunked else None


def heldout_sample(subject: Subject, test_indices, count: int, size: tuple[int, int]) -> FrameDataset | None:
    """``count`` held-out frames spread evenly over the test split (for in-training PSNR curves)."""
    if count <= 0 or not test_indices:
        return None
    pick = np.linspace(0, len(test_indices) - 1, min(count, len(test_indices))).round().astype(int)
    return FrameDataset(subject, [test_indices[i] for i in pick], size)


def _resident_batches(data: FrameDataset, sampler: InfiniteSampler, batch_size: int, num_workers: int, device: torch.device):
    """Decode every frame of ``data`` once onto ``device`` (uint8), then yield batches gathered there."""
    H, W = data.size
    n = len(data)
    image = torch.empty((n, H, W, 3), dtype=torch.uint8, device=device)
    alpha = torch.empty((n, H, W), dtype=torch.uint8, device=device)
    parsing = torch.empty((n, H, W), dtype=torch.uint8, device=device)
    index = torch.tensor(data.indices, dtype=torch.long)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False, collate_fn=collate, num_workers=num_workers,
                                         multiprocessing_context=worker_context(data.subject, num_workers))
    k = 0
    for b in loader:
        m = len(b["index"])
        image[k:k + m].copy_(b["image"])
        alpha[k:k + m].copy_(b["alpha"])
        parsing[k:k + m].copy_(b["parsing"])
        k += m
    data.clear_cache()
    order = iter(sampler)
    while True:
        pos = torch.tensor([next(order) for _ in range(batch_size)], dtype=torch.long)
        dpos = pos.to(device)
        yield {"index": index[pos], "image": image[dpos], "alpha": alpha[dpos], "parsing": parsing[dpos]}
