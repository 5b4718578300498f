"""FlashAvatar configuration.

Defaults reproduce the paper / reference code, except ``shell_layers``, ``condition_clamp`` and ``neck_anchor`` (docs/FLASHAVATAR.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from headavatar.config import check_choices
from headavatar.errors import UserError

# the head-model region the shell Gaussians cover by default (a model without it gets no shell)
DEFAULT_SHELL_REGION = "hair"


@dataclass
class FlashAvatarConfig:
    # --- Gaussian embedding
    uv_resolution: int = 128  # one Gaussian per covered texel of the head model's UV map
    exclude_boundary: bool = True  # drop texels whose triangle touches the model's 'boundary' region
    # --- deformation MLP: PE(mu_T) ⊕ condition -> Δpos, Δrot, scale exponent
    pe_frequencies: int = 8  # sin/cos at 2^0..2^7 -> 3 + 48 = 51 inputs
    mlp_width: int = 256  # hidden units per layer of the deformation MLP
    mlp_layers: int = 6  # Linear(in,256) + 5x Linear(256,256), ReLU after each, then Linear(256,10)
    # MLP matmul precision: auto = bfloat16 autocast on CUDA (3-4x faster, weights and outputs stay
    # float32), float32 elsewhere; fp32 = the reference's; bf16 = autocast wherever supported
    mlp_precision: Literal["auto", "fp32", "bf16"] = "auto"
    offset_scale: float = 1.0  # Δpos = offset_scale * tanh(.) in metres (reference: 1)
    # --- appearance
    sh_degree: int = 3  # spherical-harmonic degree of the Gaussians' colours (0-3)
    sh_increase_every: int = 500  # the active SH degree rises by one every this many iterations
    init_opacity: float = 0.1  # opacity of every Gaussian at initialisation
    init_with_mlp_offsets: bool = True  # reference: initial positions include the untrained MLP's offsets
    zero_init_deform: bool = False  # start the MLP's output layer at zero: no offset, rotation or scale change at init
    # --- regional conditioning (against memorisation; docs/FLASHAVATAR.md "Options beyond the paper")
    # off = every Gaussian sees the whole condition vector (the paper); basis = each Gaussian sees only
    # the condition entries that move its triangle in the head model (expression/extras blendshapes
    # displacing it, joints skinning it), so hair, scalp and neck, which no expression moves, cannot
    # place themselves frame by frame through the expression code; static = only the Gaussians no
    # entry moves lose the condition, the rest keep all of it
    condition_regions: Literal["off", "basis", "static"] = "off"
    # an entry moves a vertex when its displacement at unit coefficient exceeds this fraction of that
    # entry's largest displacement (joints: skin weight above it)
    region_threshold: float = 0.05
    # root = append the head pose (6D rotation of the root joint) to the condition vector, seen by every
    # Gaussian (with condition_regions=basis, hair/scalp/neck see the pose alone); none = the paper
    condition_pose: Literal["none", "root"] = "none"
    # keep each entry of the MLP's condition inside the range the training frames spanned (stored in
    # the checkpoint at the start of training): an expression the avatar never saw (a held-out frame,
    # another person driving it) then cannot push the MLP where it was never fitted (held-out PSNR
    # +0.003 to +0.065 dB on the four real clips, never lower; docs/BENCHMARKS.md)
    condition_clamp: Literal["off", "train_range"] = "train_range"
    # training only: Gaussian noise added to each condition entry, its standard deviation this fraction
    # of the entry's range over the training frames; neighbouring expressions then have to give
    # neighbouring Gaussians, so the MLP cannot key one frame's hair placement to its exact code (0 = off)
    condition_noise: float = 0.0
    # the neck's base belongs to the torso, not to the head: train_mean = neck vertices blend, from
    # the chin down to the mesh's lower rim, from the frame's head rotation to the training frames'
    # mean one (the clothing line the neck is cut at then stays put when the head turns or tilts);
    # off = the whole mesh turns with the head, as the paper; auto = train_mean for subjects from
    # video, off for synthetic ones (their generator turns head and neck as one). Needs 'neck' and
    # 'boundary' regions (docs/BENCHMARKS.md: +0.14 to +0.61 dB held-out where the neck is in view)
    neck_anchor: Literal["off", "train_mean", "auto"] = "auto"
    # share of the head's turn away from the anchor that the neck's base still follows (0 = none:
    # a torso that never turns; a person who turns the shoulders with large head turns wants more)
    neck_anchor_follow: float = 0.0
    # --- coverage off the head mesh (hair volume, long hair): shell Gaussians
    # copies of the shell_regions Gaussians stacked outward (0 = none, the paper's layout);
    # 2 measured best on real video (docs/BENCHMARKS.md)
    shell_layers: int = 2
    shell_spacing: float = 0.01  # metres between layers, along the triangle's normal (start distance of layer k: k x this)
    shell_regions: str = DEFAULT_SHELL_REGION  # comma-separated head-model regions whose Gaussians get shell copies
    lr_normal_offset: float = 1e-4  # learning rate of the per-Gaussian distance along the normal (metres)
    # --- joint refinement of the training frames' tracking (refine.py; refined values saved in
    # RUN_DIR/refined_tracking.npz and used by render/export/viewer for training frames)
    refine_tracking: bool = False
    refine_start: int = 500  # warm-up: corrections stay at zero before this iteration (the avatar settles first)
    refine_lr: float = 5e-2  # SparseAdam step, in units of the refine_sigma_* below
    # corrections are stored divided by these scales: the prior and the learning rate act in these units
    refine_sigma_rotation: float = 0.02  # radians, every joint (root = head pose, jaw, eyes when the model has them)
    refine_sigma_translation: float = 0.003  # metres
    refine_sigma_expression: float = 0.1  # expression coefficients
    refine_sigma_extras: float = 0.1  # per-frame extras of the tracking (e.g. eyelids, gaze)
    refine_prior_weight: float = 1e-4  # L2 on the scaled corrections (sum over entries, mean over the batch)
    refine_smooth_weight: float = 0.0  # L2 on the difference of scaled corrections between consecutive frames
    refine_joints: str = "all"  # comma-separated joint names to correct, "all", or "none"
    # test-time refinement defaults (`headavatar eval --refine-tracking [STEPS]`)
    test_refine_steps: int = 100
    test_refine_lr: float = 5e-2  # Adam step in refine_sigma_* units
    # --- training
    iterations: int = 150_000  # optimisation steps
    batch_size: int = 1  # frames per step
    resolution: int | None = None  # training/eval image size (square side or the long side); None = the subject's
    background: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0])  # reference: green
    lr_mlp: float = 1e-4  # Adam learning rate of the deformation MLP
    lr_sh_dc: float = 2.5e-3  # learning rate of the colours' constant SH term
    lr_sh_rest: float = 1.25e-4  # learning rate of the higher SH coefficients
    lr_opacity: float = 5e-2  # learning rate of the opacities (logits)
    lr_scale: float = 5e-3  # learning rate of the log scales
    lr_rotation: float = 1e-3  # learning rate of the rotation quaternions
    huber_delta: float = 0.1  # Huber loss threshold on the colour residuals
    mouth_weight: float = 40.0  # extra weight of the photometric term inside the mouth mask
    lpips_weight: float = 0.05  # weight of the LPIPS-VGG term (0 = off)
    lpips_start: int = 15_000  # first iteration (1-based, as the reference) with the LPIPS-VGG term
    frames_per_pass: int = 2000  # each pass over the data reshuffles and keeps at most this many frames
    seed: int = 0  # random seed of initialisation and data order
    max_seconds: float = 0.0  # stop (with a checkpoint) once training has run this long; 0 = no limit
    # --- bookkeeping
    checkpoint_every: int = 5000  # steps between checkpoints
    preview_every: int = 500  # steps between preview images (0 = none)
    log_every: int = 50  # steps between lines of curves.jsonl and the progress log
    eval_every: int = 0  # 0 = no held-out evaluation during training (curves of held-out PSNR when > 0)
    eval_frames: int = 8  # held-out frames used for the in-training PSNR curve
    # --- execution
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    backend: str = "auto"  # Gaussian rasterizer: auto | torch | triton | gsplat (a name of the backend registry, which checks it)
    # replay each training step (head model, MLP, rasteriser, losses, backward, Adam) from one CUDA
    # graph: on = where the rasteriser is Triton's on CUDA (gsplat and the torch reference synchronise
    # with the host, so they stay eager), off = always eager; steps that refine the tracking stay eager
    # (H100: batch-1 step 9.0 -> 2.5 ms, batch 8 83 -> 100-112 it/s, same fit; docs/BENCHMARKS.md)
    cuda_graph_step: Literal["off", "on"] = "on"
    # data-loading worker processes (0 = in the training process); for compact subjects they are spawned
    # (subjects/dataset.py), so a script that starts training needs an `if __name__ == "__main__":` guard
    num_workers: int = 0
    cache_mb: int = 512  # decoded uint8 frames kept in host memory
    # training frames kept on the accelerator as uint8 when they all fit in this budget (no loader in
    # the loop); larger subjects stream through the loader, so memory never grows past it
    device_cache_mb: int = 1024

    def __post_init__(self):
        check_choices(self, "FlashAvatar config")

    def check_values(self) -> None:
        if not 0.0 <= float(self.condition_noise) <= 1.0:
            raise UserError(f"condition_noise is {self.condition_noise}; use a fraction of the training range between 0 and 1")
        if not 0.0 <= float(self.neck_anchor_follow) <= 1.0:
            raise UserError(f"neck_anchor_follow is {self.neck_anchor_follow}; use a share between 0 (the neck's base keeps the anchor) and 1 (it turns too)")
