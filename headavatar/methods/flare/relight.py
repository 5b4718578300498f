"""`headavatar relight`: a FLARE avatar under a new HDR environment map, plus its intrinsic images.

Relighting swaps the neural light for a prefiltered environment
(headavatar.lighting.EnvironmentLight) in the same split-sum shading; the
materials are the learnt ones.  The environment is fixed in the world by
default (``light_frame="world"``), whatever frame the training light had.

``evaluate_relighting`` scores relit frames of a *synthetic* subject against
ground truth rendered by the subject generator under the same light with the
subject's true albedo, roughness and specular maps (docs/RELIGHTING.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.headmodels.params import FrameParams
from headavatar.lighting.color import linear_to_srgb, srgb_to_linear
from headavatar.lighting.envmap import load_light
from headavatar.methods.flare.shading import composite
from headavatar.utils.video import to_uint8, write_video

INTRINSICS = ("albedo", "roughness", "specular", "normal", "diffuse_shading", "specular_shading")


def view_directions(cameras) -> torch.Tensor:
    """[B,H,W,3] world directions of the pixel-centre rays."""
    H, W = cameras.height, cameras.width
    dev, dt = cameras.K.device, cameras.K.dtype
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + 0.5, torch.arange(W, device=dev, dtype=dt) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1)  # [H,W,3]
    d_cam = pix @ torch.linalg.inv(cameras.K).transpose(-1, -2)[:, None]  # [B,H,W,3]
    d = d_cam @ cameras.R[:, None]  # R^T d (row vectors)
    return torch.nn.functional.normalize(d, dim=-1)


def _to_image(vals: torch.Tensor, pix: torch.Tensor, B: int, H: int, W: int, fill: float = 0.0) -> torch.Tensor:
    out = torch.full((B * H * W, vals.shape[-1]), fill, dtype=vals.dtype, device=vals.device)
    return out.index_put((pix,), vals).reshape(B, H, W, -1)


@torch.no_grad()
def relight_frames(avatar, params: FrameParams, cameras, light, background=None, intrinsics: bool = False, light_frame: str = "world",
                   material_scale: torch.Tensor | None = None) -> dict:
    """Relit frames {"rgb" [B,H,W,3] sRGB, "alpha", "linear" (premultiplied radiance)} (+ intrinsic maps).

    background: None (the environment seen behind the head), an RGB triple in
    [0,1] (sRGB), or an sRGB image tensor [B,H,W,3].
    material_scale: exposure calibration of the materials (headavatar.methods.flare.calibration).
    """
    model = avatar.model
    out = model.render(params, cameras, light=light, intrinsics=intrinsics, light_frame=light_frame, material_scale=material_scale)
    B, H, W = out["rgb"].shape[:3]
    if background is None:
        env = light.background(view_directions(cameras))  # linear radiance
        bg = linear_to_srgb(env.clamp(0, 1))
    else:
        bg = torch.as_tensor(background, dtype=torch.float32, device=out["rgb"].device)
    res = {"rgb": composite(out["rgb"], out["alpha"], bg), "alpha": out["alpha"], "linear": out["rgb"]}
    if intrinsics:
        pix = out["pix"]
        res["albedo"] = _to_image(linear_to_srgb(out["kd"].clamp(0, 1)), pix, B, H, W)
        res["roughness"] = _to_image(out["kr"], pix, B, H, W).expand(-1, -1, -1, 3)
        res["specular"] = _to_image(out["ko"], pix, B, H, W).expand(-1, -1, -1, 3)
        res["normal"] = _to_image(out["n"] * 0.5 + 0.5, pix, B, H, W)
        res["diffuse_shading"] = _to_image(linear_to_srgb((out["diffuse_shading"]).clamp(0, 1)), pix, B, H, W)
        res["specular_shading"] = _to_image(linear_to_srgb((out["specular_shading"]).clamp(0, 1)), pix, B, H, W)
        res["parts"] = {k: out[k] for k in ("kd", "kr", "ko", "diffuse_shading", "specular_shading", "pix")}
    return res


def relight_run(run_dir, envmap, out_path, device="auto", frames: str = "all", batch_size: int = 4, env_size: int = 256,
                tonemap: str = "reinhard", exposure: float = 0.0, rotation: float = 0.0, spin: float = 0.0, background: str = "env",
                intrinsics: bool = True, light_frame: str = "world", progress: bool = True, head_overrides: dict | None = None,
                calibrate: str = "auto") -> dict:
    """Relight a FLARE run's sequence: writes OUT.mp4 (+ OUT_intrinsics.mp4 and OUT_intrinsics/*.png of the first frame).

    envmap: .hdr/.exr lat-long map, or "sky" for the built-in procedural sky.
    spin: degrees the environment turns about the vertical over the clip (0 = fixed).
    background: env (the map behind the head), white, black or grey.
    head_overrides: options to build the subject's head model here (e.g. {"dir": FLAME folder}).
    calibrate: exposure calibration against the capture light (headavatar.methods.flare.calibration.capture_light).
    """
    from tqdm import tqdm

    from headavatar.methods import load_avatar
    from headavatar.methods.run import RunDir
    from headavatar.utils.io import write_image

    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise UserError(f"output {out_path} must be a video file (.mp4)")
    info = RunDir(run_dir).read_info()
    if info.get("method") != "flare":
        raise UserError(f"{run_dir} is a '{info.get('method')}' run: only FLARE avatars can be relit (train one with --method flare)")
    bgs = {"env": None, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5)}
    if background not in bgs:
        raise UserError(f"--background must be one of {', '.join(bgs)} (got {background!r})")
    if light_frame not in ("world", "head"):
        raise UserError(f"--light-frame must be world or head (got {light_frame!r})")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    from headavatar.utils.device import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    light0 = load_light(envmap, env_size, tonemap, 2.0, exposure, rotation, dev)  # a bad map fails before the model loads
    avatar = load_avatar(run_dir, dev, head_overrides)
    from headavatar.methods.flare.calibration import resolve_exposure

    scale = resolve_exposure(avatar, calibrate, tonemap)
    subj = avatar.subject
    tr = subj.tracking
    idx_all = {"all": list(range(subj.num_frames)), "test": subj.split.get("test", []), "train": subj.split["train"]}.get(frames)
    if idx_all is None:
        raise UserError(f"--frames must be all, train or test (got {frames})")
    if not idx_all:
        raise UserError("no frames to relight")
    H, W = avatar.size
    first: dict | None = None
    grid_frames: list[np.ndarray] = []

    def frames_iter():
        nonlocal first
        bar = tqdm(total=len(idx_all), disable=not progress, desc="relight", unit="frame")
        n = len(idx_all)
        for s in range(0, n, batch_size):
            ii = np.array(idx_all[s : s + batch_size])
            params = tr.params(ii, dev)
            cams = tr.cameras(ii, subj.height, subj.width, dev).resized(H, W)
            for j in range(len(ii)):
                k = s + j
                light = light0.rotated(spin * k / max(1, n - 1)) if spin else light0
                one = params[j]
                res = relight_frames(avatar, one, cams[j], light, bgs[background], intrinsics, light_frame, scale)
                if intrinsics:
                    row1 = torch.cat([res["rgb"][0], res["albedo"][0], res["roughness"][0], res["specular"][0]], 1)
                    row2 = torch.cat([res["normal"][0], res["diffuse_shading"][0], res["specular_shading"][0], res["alpha"][0].expand(-1, -1, 3)], 1)
                    grid_frames.append(to_uint8(torch.cat([row1, row2], 0)))
                    if first is None:
                        first = {k2: to_uint8(res[k2][0]) for k2 in ("rgb",) + INTRINSICS}
                yield to_uint8(res["rgb"][0])
            bar.update(len(ii))
        bar.close()

    n = write_video(out_path, frames_iter(), fps=subj.fps)
    outputs = {"video": str(out_path), "frames": n, "exposure_scale": None if scale is None else [round(float(x), 4) for x in scale]}
    if intrinsics and grid_frames:
        grid = out_path.with_name(out_path.stem + "_intrinsics" + out_path.suffix)
        write_video(grid, grid_frames, fps=subj.fps)
        folder = out_path.with_name(out_path.stem + "_intrinsics")
        for k, img in (first or {}).items():
            write_image(folder / f"{'relit' if k == 'rgb' else k}.png", img)
        outputs.update({"intrinsics_video": str(grid), "intrinsics_folder": str(folder),
                        "intrinsics_layout": "top: relit | albedo | roughness | specular intensity; "
                                             "bottom: normals | diffuse shading | specular shading | alpha"})
    return outputs


# ------------------------------------------------------------------ evaluation against ground truth
@torch.no_grad()
def evaluate_relighting(run_dir, envmap="sky", device="auto", frames: str = "test", env_size: int = 128, tonemap: str = "reinhard",
                        exposure: float = 0.0, rotation: float = 0.0, supersample: int = 2, max_frames: int | None = None,
                        write_images: bool = True) -> dict:
    """Relit PSNR of a FLARE run on a synthetic subject against the generator's own render under the same light.

    Both images are composited over white with the ground-truth matte; PSNR is
    reported over the whole image (the IMavatar protocol's convention) and as
    the mean over the matte.  The learnt albedo is only defined up to a scale
    per channel against the training light (kd * D is what the images
    constrain), so three figures are given:

    * ``*_raw``: the learnt materials as they are (uncalibrated);
    * ``*_calibrated``: after the exposure calibration against the subject's
      recorded capture light (headavatar.methods.flare.calibration; uses the
      light, not the true albedo), what ``headavatar relight`` does by default;
    * ``*_albedo_aligned``: after fitting the scale on the albedo itself (least
      squares against the true albedo, the usual protocol of inverse-rendering
      benchmarks).
    """
    from headavatar.headmodels.procedural_texture import procedural_textures
    from headavatar.lighting.envmap import EnvMapLighting
    from headavatar.methods import load_avatar
    from headavatar.methods.flare.calibration import exposure_scale
    from headavatar.subjects.synthetic import capture_lighting, render_synthetic_frames
    from headavatar.utils.io import write_image, write_json

    avatar = load_avatar(run_dir, device)
    subj = avatar.subject
    synth = subj.meta.get("synthetic")
    if not synth:
        raise UserError(f"{subj.root} is not a synthetic subject: relighting ground truth exists only for subjects made by 'headavatar synth'")
    dev = avatar.device
    light = load_light(envmap, env_size, tonemap, 2.0, exposure, rotation, dev)
    capture = capture_lighting(synth)
    exposure_k = exposure_scale(avatar, capture) if capture is not None else None
    head = subj.head_model(**avatar.run.head_overrides)
    tex_cfg = synth.get("texture", {})
    tex = procedural_textures(head, size=int(tex_cfg.get("size", 512)), seed=int(tex_cfg.get("seed", synth.get("seed", 0))))
    tr = subj.tracking
    idx = {"all": list(range(subj.num_frames)), "test": subj.split.get("test", []), "train": subj.split["train"]}[frames]
    if max_frames:
        idx = idx[:max_frames]
    H, W = avatar.size
    gt_light = EnvMapLighting(light, frame="world", f0=0.04)
    alb_light = _AlbedoLighting()
    rows, pairs = [], []
    num = torch.zeros(3, dtype=torch.float64)
    den = torch.zeros(3, dtype=torch.float64)
    cache = []
    for i in idx:
        cams = tr.cameras([i], subj.height, subj.width).resized(H, W)
        gt, alpha, _ = render_synthetic_frames(head, tex, tr.subset([i]), cams, gt_light, None, supersample, device=dev)
        gt_alb, _, _ = render_synthetic_frames(head, tex, tr.subset([i]), cams, alb_light, None, supersample, device=dev)
        res = relight_frames(avatar, tr.params([i], dev), cams.to(dev), light, (1.0, 1.0, 1.0), True, "world")
        if exposure_k is not None:
            res["calibrated"] = relight_frames(avatar, tr.params([i], dev), cams.to(dev), light, (1.0, 1.0, 1.0), False, "world", exposure_k)["rgb"][0].cpu()
        a = torch.from_numpy(alpha[0]).float()[..., None] / 255
        g = torch.from_numpy(gt[0]).float() / 255
        g = (g - 0.5 * (1 - a)) / a.clamp_min(1e-6)  # un-composite the generator's grey backdrop
        g_alb = (torch.from_numpy(gt_alb[0]).float() / 255 - 0.5 * (1 - a)) / a.clamp_min(1e-6)
        parts = res["parts"]
        pix = parts["pix"].cpu()
        inside = a.reshape(-1)[pix] > 0.99  # fully covered pixels for the albedo fit
        kd = parts["kd"].cpu().double()
        true_kd = srgb_to_linear(g_alb.clamp(0, 1)).reshape(-1, 3)[pix].double()
        num += (kd[inside] * true_kd[inside]).sum(0)
        den += (kd[inside] ** 2).sum(0)
        cache.append((i, g, a, res, parts))
    s = (num / den.clamp_min(1e-12)).float()  # per-channel albedo scale
    for i, g, a, res, parts in cache:
        pred = res["rgb"][0].cpu()
        lin = parts["kd"].cpu() * s * parts["diffuse_shading"].cpu() + parts["ko"].cpu() * parts["specular_shading"].cpu()
        alpha_p = res["alpha"][0].cpu()
        img = torch.zeros(H * W, 3).index_put((parts["pix"].cpu(),), linear_to_srgb(lin.clamp(0, 1))).reshape(H, W, 3)
        aligned = img * alpha_p + (1 - alpha_p)
        row = {"frame": int(i)}
        variants = [("raw", pred)] + ([("calibrated", res["calibrated"])] if exposure_k is not None else []) + [("albedo_aligned", aligned)]
        for name, p in variants:
            pw = p * a + (1 - a)
            gw = g.clamp(0, 1) * a + (1 - a)
            err = ((pw - gw) ** 2 * a).sum()
            row[f"psnr_{name}"] = float(-10 * torch.log10(err / (H * W * 3)))
            row[f"psnr_matte_{name}"] = float(-10 * torch.log10(err / (3 * a.sum()).clamp_min(1)))
        rows.append(row)
        pairs.append(np.concatenate([to_uint8(g.clamp(0, 1) * a + (1 - a))] + [to_uint8(p * a + (1 - a)) for _, p in variants], 1))
    keys = [k for k in rows[0] if k != "frame"]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    result = {"envmap": str(envmap), "frames": [r["frame"] for r in rows], "albedo_scale": s.tolist(),
              "exposure_scale": None if exposure_k is None else exposure_k.tolist(), "mean": summary, "per_frame": rows,
              "images": "gt | " + " | ".join(name for name, _ in variants),
              "protocol": "GT = synthetic generator under the same EnvironmentLight (world frame, F0 0.04) with the true maps; "
                          "both composited on white with the GT matte; psnr_* over all pixels (IMavatar convention), psnr_matte_* over the matte"}
    out_dir = Path(run_dir) / "relight_eval"
    write_json(out_dir / "metrics.json", result)
    if write_images:
        for j, img in enumerate(pairs[:4]):
            write_image(out_dir / f"gt_relit_{rows[j]['frame']:06d}.png", img)
    return result


class _AlbedoLighting:
    """Unit diffuse light, no specular: the generator's render is then the albedo (sRGB-encoded)."""

    frame = "world"

    def diffuse(self, n):
        return torch.ones_like(n)

    def specular(self, n, v, roughness):
        return None
