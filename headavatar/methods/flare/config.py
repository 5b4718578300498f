"""FLARE configuration. Defaults reproduce the reference's config files (../shared/reference/flare.md;
deviations in docs/FLARE.md).

Schedule iterations (remesh, prior halving, ...) are given in the reference's
stage-1 iterations and, with ``schedule="scaled"``, stretched to the actual
``iterations``: at the default 1500 + 1000 they are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlareConfig:
    # --- steps (counted optimisation steps, not epochs: the reference's epoch overshoot is not kept)
    iterations: int = 2500  # both stages together
    stage2_iterations: int = 1000  # the last this many steps are stage 2 (hash-grid materials, frozen deformer)
    batch_size: int = 4
    schedule: str = "scaled"  # scaled | absolute: how the schedule iterations below follow a changed stage-1 length
    # --- geometry
    world_scale: float = 4.0  # the reference works in FLAME x4 units; lr, thresholds and weights assume them
    canonical_jaw_open: float = 0.4  # rad, canonical jaw opening (reference; IMavatar: 0.2)
    remesh_at: list[int] = field(default_factory=lambda: [500])  # stage-1 iterations with one isotropic remesh each
    remesh_edge_factor: float = 1.5  # target edge length = mean edge length / this
    remesh_backend: str = "auto"  # auto (gpytoolbox if installed) | gpytoolbox | builtin
    remesh_lr_factor: float = 0.75  # vertex learning rate x this after each remesh
    remesh_reg_factor: float = 4.0  # Laplacian and normal weights x this after each remesh
    near_far: list[float] = field(default_factory=lambda: [0.5, 1.5])  # x min / max camera distance to the canonical box
    # --- deformation network
    deformer_width: int = 128
    deformer_layers: int = 4
    skinning_sharpness: float = 20.0  # softmax(20 x)
    num_expression: int | None = None  # expression coefficients modelled (None: all of the head model's; the reference's tracking had 50)
    # --- materials
    pe_frequencies: int = 4  # stage 1: NeRF positional encoding -> 3 + 24 = 27 inputs
    material_width: int = 128
    material_layers: int = 4  # hidden 128->128 layers after the input layer
    hash_levels: int = 16
    hash_features: int = 2
    hash_log2_size: int = 19
    hash_base_resolution: int = 16
    hash_scale: float = 1.4473
    hash_mlp_width: int = 64
    hash_mlp_layers: int = 2
    aabb_margin: float = 0.1  # canonical box grown by this fraction per side before normalising to [0,1]
    # --- light
    light_width: int = 64
    light_layers: int = 2
    light_frame: str = "auto"  # world (lights fixed in the room: the reference) | head (lights turn with the head) | auto: head for a synthetic subject rendered with head-fixed lights, else world
    light_activation: str = "softplus"  # softplus (Softplus(beta=100), the fix for flare#2/#4) | none (reference)
    light_init_bias: float = 0.5  # output bias at init: starts the light bright enough for Softplus to pass gradients
    ide_attenuation: str = "refnerf"  # refnerf: exp(-l(l+1)/2 * r) | flare: exp(-l(l+1)/2 / r) as coded there
    stage2_new_light: bool = True  # stage 2 builds a new shader (materials and light), as the reference
    f0_stage1: float = 0.04
    f0_skin: float = 0.028
    f0_other: float = 0.047
    lut_size: int = 128
    lut_samples: int = 512
    # --- learning rates (Adam, constant)
    lr_vertices: float = 1e-3
    lr_vertices_stage2: float = 1e-5
    lr_deformer: float = 1e-3
    lr_shader: float = 1e-3
    lr_robust: float = 1e-3
    # --- loss weights
    w_shading: float = 0.25  # reference: 1.0, then divided by the batch size (4) a second time
    w_perceptual: float = 0.1  # x min(1, 600 / (it + 1))
    perceptual_decay: int = 600
    perceptual_size: int = 224
    w_mask: float = 2.0
    w_laplacian: float = 60.0
    w_normal: float = 0.1
    w_albedo: float = 0.01  # x min(1, it / 500)
    albedo_ramp: int = 500
    albedo_jitter: float = 0.01
    albedo_samples: int = 0  # vertices per step for the albedo term (0 = all, the reference; fewer = cheaper on a CPU)
    w_white_light: float = 0.01
    w_roughness: float = 0.01
    w_specular: float = 0.01
    roughness_prior: list[float] = field(default_factory=lambda: [0.5, 0.1])  # mean, std on skin
    specular_prior: list[float] = field(default_factory=lambda: [0.3753, 0.1655])
    w_flame: float = 1.0  # halved at flame_halve_at
    flame_halve_at: int = 100
    flame_semantic_from: int = 300  # mouth interior / cloth targets from this iteration on
    flame_weight_skinning: float = 5.0  # effective 10 * 0.5
    flame_weight_blendshape: float = 1e4
    flame_max_dist2: float = 1e-3  # squared distance (world_scale units) for a vertex to take its nearest model vertex as prior
    # --- divergence handling
    collapse_threshold: float = 1e-6  # mean diffuse light below this = collapsed
    max_recoveries: int = 3  # restarts from the last good state (learning rates halved each time) before giving up
    # --- output / evaluation
    resolution: int | None = None  # training/eval image size (long side); None = the subject's
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # renders composited on white (IMavatar protocol)
    seed: int = 0
    checkpoint_every: int = 500
    preview_every: int = 250
    log_every: int = 25
    eval_every: int = 0
    eval_frames: int = 8
    frames_per_pass: int = 2000
    # --- execution
    device: str = "auto"
    mesh_backend: str = "auto"  # auto | torch | nvdiffrast
    backend: str = "auto"  # accepted for CLI symmetry with FlashAvatar; FLARE uses mesh_backend
    num_workers: int = 0
    cache_mb: int = 512
    device_cache_mb: int = 1024  # on CUDA, keep every training frame on the GPU (uint8) when they fit in this much; else stream them
