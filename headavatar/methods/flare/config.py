"""FLARE configuration. Defaults reproduce the reference's config files (../shared/reference/flare.md;
deviations in docs/FLARE.md).

Schedule iterations (remesh, prior halving, ...) are given in the reference's
stage-1 iterations and, with ``schedule="scaled"``, stretched to the actual
``iterations``: at the default 1500 + 1000 they are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from headavatar.config import check_choices


@dataclass
class FlareConfig:
    # --- steps (counted optimisation steps, not epochs: the reference's epoch overshoot is not kept)
    iterations: int = 2500  # both stages together
    stage2_iterations: int = 1000  # the last this many steps are stage 2 (hash-grid materials, frozen deformer)
    batch_size: int = 4  # frames per step
    schedule: Literal["scaled", "absolute"] = "scaled"  # how the schedule iterations below follow a changed stage-1 length
    # --- geometry
    world_scale: float = 4.0  # the reference works in FLAME x4 units; lr, thresholds and weights assume them
    canonical_jaw_open: float = 0.4  # rad, canonical jaw opening (reference; IMavatar: 0.2)
    remesh_at: list[int] = field(default_factory=lambda: [500])  # stage-1 iterations with one isotropic remesh each
    remesh_edge_factor: float = 1.5  # target edge length = mean edge length / this
    remesh_backend: Literal["auto", "gpytoolbox", "builtin"] = "auto"  # auto: gpytoolbox if installed, else builtin
    remesh_lr_factor: float = 0.75  # vertex learning rate x this after each remesh
    remesh_reg_factor: float = 4.0  # Laplacian and normal weights x this after each remesh
    near_far: list[float] = field(default_factory=lambda: [0.5, 1.5])  # x min / max camera distance to the canonical box
    # --- deformation network
    deformer_width: int = 128  # hidden units per layer of the deformation network
    deformer_layers: int = 4  # hidden layers of the deformation network
    skinning_sharpness: float = 20.0  # softmax(20 x)
    num_expression: int | None = None  # expression coefficients modelled (None: all of the head model's; the reference's tracking had 50)
    # --- materials
    pe_frequencies: int = 4  # stage 1: NeRF positional encoding -> 3 + 24 = 27 inputs
    material_width: int = 128  # hidden units per layer of the stage-1 material MLP
    material_layers: int = 4  # hidden 128->128 layers after the input layer
    hash_levels: int = 16  # stage 2 hash grid: resolution levels
    hash_features: int = 2  # stage 2 hash grid: features per level
    hash_log2_size: int = 19  # stage 2 hash grid: log2 of the table size per level
    hash_base_resolution: int = 16  # stage 2 hash grid: coarsest resolution
    hash_scale: float = 1.4473  # stage 2 hash grid: resolution growth factor between levels
    hash_mlp_width: int = 64  # hidden units of the MLP after the hash grid
    hash_mlp_layers: int = 2  # hidden layers of the MLP after the hash grid
    aabb_margin: float = 0.1  # canonical box grown by this fraction per side before normalising to [0,1]
    # --- light
    light_width: int = 64  # hidden units of the neural light MLP
    light_layers: int = 2  # hidden layers of the neural light MLP
    # world: lights fixed in the room (the reference); head: lights turn with the head;
    # auto: head for a synthetic subject rendered with head-fixed lights, else world
    light_frame: Literal["auto", "world", "head"] = "auto"
    light_activation: Literal["softplus", "none"] = "softplus"  # softplus (Softplus(beta=100), the fix for flare#2/#4) | none (reference)
    light_init_bias: float = 0.5  # output bias at init: starts the light bright enough for Softplus to pass gradients
    ide_attenuation: Literal["refnerf", "flare"] = "refnerf"  # refnerf: exp(-l(l+1)/2 * r) | flare: exp(-l(l+1)/2 / r) as coded there
    stage2_new_light: bool = True  # stage 2 builds a new shader (materials and light), as the reference
    f0_stage1: float = 0.04  # Fresnel reflectance at normal incidence everywhere in stage 1
    f0_skin: float = 0.028  # Fresnel reflectance at normal incidence on skin (stage 2)
    f0_other: float = 0.047  # Fresnel reflectance at normal incidence off skin (stage 2)
    lut_size: int = 128  # side of the split-sum BRDF lookup table
    lut_samples: int = 512  # importance samples per entry of the BRDF lookup table
    # --- learning rates (Adam, constant)
    lr_vertices: float = 1e-3  # learning rate of the canonical vertices (stage 1)
    lr_vertices_stage2: float = 1e-5  # learning rate of the canonical vertices in stage 2
    lr_deformer: float = 1e-3  # learning rate of the deformation network
    lr_shader: float = 1e-3  # learning rate of materials and light
    lr_robust: float = 1e-3  # learning rate of the robust loss's adaptive parameters
    # --- loss weights
    w_shading: float = 0.25  # reference: 1.0, then divided by the batch size (4) a second time
    w_perceptual: float = 0.1  # x min(1, 600 / (it + 1))
    perceptual_decay: int = 600  # the perceptual weight decays as min(1, this / (it + 1))
    perceptual_size: int = 224  # image side at which the VGG perceptual term is computed
    w_mask: float = 2.0  # weight of the silhouette (mask) term
    w_laplacian: float = 60.0  # weight of the Laplacian smoothness term on the canonical mesh
    w_normal: float = 0.1  # weight of the normal consistency term on the canonical mesh
    w_albedo: float = 0.01  # x min(1, it / 500)
    albedo_ramp: int = 500  # iterations over which w_albedo ramps up from 0
    albedo_jitter: float = 0.01  # canonical-space jitter (world_scale units) of the albedo smoothness term
    albedo_samples: int = 0  # vertices per step for the albedo term (0 = all, the reference; fewer = cheaper on a CPU)
    w_white_light: float = 0.01  # weight pulling the learnt diffuse light towards white
    w_roughness: float = 0.01  # weight of the roughness prior on skin
    w_specular: float = 0.01  # weight of the specular-intensity prior on skin
    roughness_prior: list[float] = field(default_factory=lambda: [0.5, 0.1])  # mean, std on skin
    specular_prior: list[float] = field(default_factory=lambda: [0.3753, 0.1655])  # mean, std of specular intensity on skin
    w_flame: float = 1.0  # halved at flame_halve_at
    flame_halve_at: int = 100  # iteration at which w_flame is halved
    flame_semantic_from: int = 300  # mouth interior / cloth targets from this iteration on
    flame_weight_skinning: float = 5.0  # effective 10 * 0.5
    flame_weight_blendshape: float = 1e4  # weight of the blendshape part of the head-model prior
    flame_max_dist2: float = 1e-3  # squared distance (world_scale units) for a vertex to take its nearest model vertex as prior
    # --- divergence handling
    collapse_threshold: float = 1e-6  # mean diffuse light below this = collapsed
    max_recoveries: int = 3  # restarts from the last good state (learning rates halved each time) before giving up
    # --- output / evaluation
    resolution: int | None = None  # training/eval image size (long side); None = the subject's
    background: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # renders composited on white (IMavatar protocol)
    seed: int = 0  # random seed of initialisation and data order
    checkpoint_every: int = 500  # steps between checkpoints
    preview_every: int = 250  # steps between preview images (0 = none)
    log_every: int = 25  # steps between lines of curves.jsonl and the progress log
    eval_every: int = 0  # 0 = no held-out evaluation during training (curves of held-out PSNR when > 0)
    eval_frames: int = 8  # held-out frames used for the in-training PSNR curve
    frames_per_pass: int = 2000  # each pass over the data reshuffles and keeps at most this many frames
    # --- execution
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    mesh_backend: Literal["auto", "torch", "nvdiffrast"] = "auto"  # mesh rasteriser: auto = nvdiffrast on CUDA when installed, else torch
    backend: Literal["auto", "torch", "nvdiffrast"] = "auto"  # accepted for CLI symmetry with FlashAvatar; FLARE uses mesh_backend
    # data-loading worker processes (0 = in the training process); for compact subjects they are spawned
    # (subjects/dataset.py), so a script that starts training needs an `if __name__ == "__main__":` guard
    num_workers: int = 0
    cache_mb: int = 512  # decoded uint8 frames kept in host memory
    device_cache_mb: int = 1024  # on CUDA, keep every training frame on the GPU (uint8) when they fit in this much; else stream them

    def __post_init__(self):
        check_choices(self, "FLARE config")
