"""Tiny real runs for the export and viewer tests (built in seconds on a CPU).

* ``tiny_flashavatar_run``: a FlashAvatar trained for 3 iterations on an 8-frame synthetic subject.
* ``untrained_flare_run``: a FLARE run folder holding a checkpoint of a freshly built
  model (training FLARE even for a few steps takes about a minute here); its
  blendshape head gets small seeded weights so the morph targets are not zero,
  and ``mesh="sphere"`` swaps in a small remeshed-like mesh (no head-model UVs).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch

FA_TINY = {"iterations": 3, "resolution": 48, "uv_resolution": 32, "mlp_width": 32, "lpips_weight": 0.0}
FLARE_TINY = {"resolution": 48, "hash_levels": 4, "hash_log2_size": 12, "lut_size": 16, "lut_samples": 32, "material_width": 32,
              "deformer_width": 32, "light_width": 16}


def synthetic_subject(root: Path) -> Path:
    from headavatar.subjects.synthetic import make_synthetic_subject

    make_synthetic_subject(root, num_frames=8, resolution=48, progress=False)
    return root


def tiny_flashavatar_run(subject: Path, run: Path) -> Path:
    from headavatar.methods import train_method

    train_method("flashavatar", subject, run, dict(FA_TINY), progress=False)
    return run


def untrained_flare_run(subject: Path, run: Path, mesh: str = "head", seed: int = 0) -> Path:
    from headavatar.config import apply_overrides
    from headavatar.methods.flare.build import build_model
    from headavatar.methods.flare.config import FlareConfig
    from headavatar.methods.run import RunDir
    from headavatar.subjects.format import Subject

    cfg = apply_overrides(FlareConfig(), dict(FLARE_TINY))
    subj = Subject.open(subject)
    torch.manual_seed(seed)
    model = build_model(subj, cfg, torch.device("cpu"))
    if mesh == "sphere":
        import trimesh

        sph = trimesh.creation.icosphere(subdivisions=2, radius=0.08 * model.scale)
        model.set_mesh(torch.as_tensor(sph.vertices, dtype=torch.float32), torch.as_tensor(sph.faces))
    with torch.no_grad():
        torch.nn.init.normal_(model.deformer.blend.weight, std=2e-3)
    rd = RunDir(run)
    rd.write_info("flare", subject, cfg, {"light_frame": "world"})
    rd.save_checkpoint(0, {"step": 0, "stage": 1, "mesh": {"verts": model.base_verts.detach().cpu(), "faces": model.faces.cpu()},
                           "model": model.state_dict()})
    return run


def shared_runs(tmp_path_factory) -> dict[str, Path]:
    """The subject and the three runs, built once per test session and shared by the pytest-xdist workers.

    They live beside the workers' own temporary folders; a file lock lets the first
    worker build them while the others wait.  Tests must treat them as read-only
    (copy a run before writing into it).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, common to all workers
    root = base / "avatar_runs"
    root.mkdir(exist_ok=True)
    runs = {"subject": root / "subject", "fa": root / "fa", "flare": root / "flare", "flare_sphere": root / "flare_sphere"}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            synthetic_subject(runs["subject"])
            tiny_flashavatar_run(runs["subject"], runs["fa"])
            untrained_flare_run(runs["subject"], runs["flare"])
            untrained_flare_run(runs["subject"], runs["flare_sphere"], mesh="sphere")
            (root / "done").touch()
    return runs
