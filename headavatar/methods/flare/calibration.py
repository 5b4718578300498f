"""Exposure calibration of a FLARE avatar against a known capture light.

The training images constrain only kd·D (albedo times the learnt light's
diffuse shading): any per-channel factor can move between the two, so the
learnt albedo is on an arbitrary scale, and a relit image under a new light of
known intensity comes out too bright or too dark by that factor.  When the
light the subject was filmed under is known (a synthetic subject records it; a
real capture can supply a light probe), the factor is measured: the learnt
diffuse light D_l is compared with the capture light's D_c on the surface
normals the training frames show, k = argmin Σ (D_l − k·D_c)² per channel,
and the albedo and specular intensity are multiplied by k (a light k× too dim
means materials 1/k× too bright).  The training renders are unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.methods.flare.model import to_light_frame


@torch.no_grad()
def exposure_scale(avatar, capture, frames: int = 8) -> torch.Tensor:
    """Per-channel factor [3] to multiply the learnt materials by, so that they match ``capture``.

    ``capture``: a lighting with ``.frame`` ("head"/"world") and ``.diffuse(n)`` (D = irradiance/π),
    e.g. headavatar.subjects.synthetic.StudioLighting or headavatar.lighting.EnvMapLighting.
    Uses up to ``frames`` training frames spread over the clip.
    """
    model, subj = avatar.model, avatar.subject
    tr = subj.tracking
    train = subj.split["train"]
    pick = sorted({train[i] for i in np.linspace(0, len(train) - 1, min(frames, len(train))).round().astype(int)})
    learnt_frame = avatar.run.read_info().get("light_frame", "world")
    H, W = avatar.size
    dev = avatar.device
    num = torch.zeros(3, dtype=torch.float64)
    den = torch.zeros(3, dtype=torch.float64)
    for i in pick:
        params = tr.params([i], dev)
        cams = tr.cameras([i], subj.height, subj.width, dev).resized(H, W)
        out = model.render(params, cams, light_frame=learnt_frame)
        b = torch.zeros(out["n"].shape[0], dtype=torch.long, device=dev)
        d_learnt = out["diffuse"].double().cpu()
        (n_capture,) = to_light_frame(capture.frame, params, b, out["n"])
        d_capture = capture.diffuse(n_capture.cpu()).double()
        num += (d_learnt * d_capture).sum(0)
        den += (d_capture * d_capture).sum(0)
    if float(den.min()) <= 0:
        raise UserError("exposure calibration failed: the capture light is black on every surface the training frames show")
    return (num / den).float()


def capture_light(avatar, calibrate: str | Path, env_size: int = 64, tonemap: str = "reinhard"):
    """The capture lighting named by ``calibrate``, or None for no calibration.

    ``calibrate``: "auto" (the subject's recorded capture light when it has one, else none), "none",
    "subject" (require the recorded one), or a lat-long .hdr/.exr light probe of the capture
    environment (world frame, prepared with the same ``tonemap`` as the new map).
    """
    from headavatar.subjects.synthetic import capture_lighting

    key = str(calibrate)
    if key == "none":
        return None
    if key in ("auto", "subject"):
        light = capture_lighting(avatar.subject.meta.get("synthetic"))
        if light is None and key == "subject":
            raise UserError(f"{avatar.subject.root} records no capture light: calibrate with a light probe (--calibrate PROBE.hdr) or use --calibrate none")
        return light
    from headavatar.lighting.envmap import EnvMapLighting, load_light

    if not Path(key).is_file():
        raise UserError(f"--calibrate {key}: no such light probe (give auto, none, subject or a .hdr/.exr file)")
    return EnvMapLighting(load_light(key, env_size, tonemap, 2.0, 0.0, 0.0, "cpu"), frame="world")


def resolve_exposure(avatar, calibrate: str | Path = "auto", tonemap: str = "reinhard") -> torch.Tensor | None:
    """Material factor [3] for ``calibrate`` (None: uncalibrated)."""
    light = capture_light(avatar, calibrate, tonemap=tonemap)
    return None if light is None else exposure_scale(avatar, light)


__all__ = ["exposure_scale", "capture_light", "resolve_exposure"]
