"""Mesh rasteriser benchmark: the torch backend against nvdiffrast (when importable).

Scene: a geodesic sphere (~10k faces) of radius 0.1 m seen from 0.7 m with a
20 degree field of view, one slightly different pose per batch element.
Measures, per resolution: rasterize / interpolate / antialias forward time and
forward+backward time of each backend; with nvdiffrast also coverage and
triangle-id agreement, interpolated-attribute error, antialiased-image error
and the cosine between the two backends' gradients.

    python benchmarks/mesh_parity.py --device cuda --res 512 --batch 4 --out parity.json
    python benchmarks/mesh_parity.py --device cpu --res 128 256 512 --batch 1
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from headavatar.camera import Cameras, fov_to_focal, intrinsics, look_at
from headavatar.render.mesh import nvdiffrast_available
from headavatar.render.mesh.torch_ref import TorchMeshBackend, edge_topology
from headavatar.utils.rotations import axis_angle_to_matrix


def geodesic_sphere(freq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit sphere: an icosahedron whose faces are split into freq^2 triangles (20 freq^2 faces)."""
    t = (1 + 5**0.5) / 2
    ico_v = torch.tensor(
        [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
         [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
        dtype=torch.float64,
    )
    ico_f = torch.tensor(
        [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2],
         [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5],
         [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]]
    )
    # Lattice points (i, j) with i + j <= freq on each face, and its small triangles.
    ij = [(i, j) for i in range(freq + 1) for j in range(freq + 1 - i)]
    lid = {p: k for k, p in enumerate(ij)}
    small = []
    for i in range(freq):
        for j in range(freq - i):
            small.append((lid[i, j], lid[i + 1, j], lid[i, j + 1]))
            if j < freq - i - 1:
                small.append((lid[i + 1, j], lid[i + 1, j + 1], lid[i, j + 1]))
    ijt = torch.tensor(ij, dtype=torch.float64) / freq
    small = torch.tensor(small)
    pts, faces = [], []
    for k, (a, b, c) in enumerate(ico_v[ico_f]):
        pts.append(a + (b - a) * ijt[:, :1] + (c - a) * ijt[:, 1:])
        faces.append(small + k * len(ij))
    P = torch.nn.functional.normalize(torch.cat(pts), dim=-1)
    uniq, inv = torch.unique(torch.round(P * 1e6).long(), dim=0, return_inverse=True)
    verts = torch.zeros(len(uniq), 3, dtype=torch.float64).index_copy(0, inv, P)
    return verts.float(), inv[torch.cat(faces)]


def make_scene(res: int, batch: int, freq: int, device) -> dict:
    verts, faces = geodesic_sphere(freq)
    g = torch.Generator().manual_seed(0)
    # Squash the sphere a little so poses differ visibly, then rotate/shift per batch element.
    verts = verts * torch.tensor([1.0, 1.2, 0.9]) * 0.1
    rot = axis_angle_to_matrix((torch.rand(batch, 3, generator=g) - 0.5) * 0.6)
    shift = (torch.rand(batch, 1, 3, generator=g) - 0.5) * 0.02
    world = verts[None] @ rot.transpose(-1, -2) + shift
    f = fov_to_focal(math.radians(20.0), res)
    R, t = look_at(torch.tensor([0.0, 0.0, 0.7]).expand(batch, 3), torch.zeros(batch, 3))
    cams = Cameras(intrinsics(f, f, res / 2, res / 2).expand(batch, 3, 3), R, t, res, res)
    return {
        "clip": cams.to_clip(world, near=0.1, far=10.0).to(device),
        "faces": faces.to(device),
        "colour": torch.rand(verts.shape[0], 3, generator=g).to(device),
        "weights": torch.rand(batch, res, res, 3, generator=g).to(device),
    }


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(iters):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    # On a shared CPU, process time (summed over threads) is steadier than wall time.
    return {"median_ms": statistics.median(times), "min_ms": min(times), "cpu_median_ms": statistics.median(cpu)}


def run_backend(be, scene: dict, res: int, topology=None) -> dict:
    clip = scene["clip"].detach().requires_grad_(True)
    colour = scene["colour"].detach().requires_grad_(True)
    faces = scene["faces"]
    rast = be.rasterize(clip, faces, (res, res))
    img = be.interpolate(colour, rast, faces)
    kw = {"topology": topology} if topology is not None else {}
    out = be.antialias(img, rast, clip, faces, **kw)
    (out * scene["weights"]).sum().backward()
    return {"rast": rast.detach(), "img": img.detach(), "aa": out.detach(), "g_clip": clip.grad, "g_col": colour.grad}


def time_backend(be, scene: dict, res: int, device, iters: int, topology=None) -> dict:
    faces, clip, colour = scene["faces"], scene["clip"], scene["colour"]
    kw = {"topology": topology} if topology is not None else {}
    rast = be.rasterize(clip, faces, (res, res))
    img = be.interpolate(colour, rast, faces)

    def fwd_bwd():
        c = clip.detach().requires_grad_(True)
        a = colour.detach().requires_grad_(True)
        r = be.rasterize(c, faces, (res, res))
        o = be.antialias(be.interpolate(a, r, faces), r, c, faces, **kw)
        (o * scene["weights"]).sum().backward()

    def fwd():
        r = be.rasterize(clip, faces, (res, res))
        be.antialias(be.interpolate(colour, r, faces), r, clip, faces, **kw)

    with torch.no_grad():
        out = {
            "rasterize": timed(lambda: be.rasterize(clip, faces, (res, res)), device, iters),
            "interpolate": timed(lambda: be.interpolate(colour, rast, faces), device, iters),
            "antialias": timed(lambda: be.antialias(img, rast, clip, faces, **kw), device, iters),
            "forward": timed(fwd, device, iters),
        }
    out["forward_backward"] = timed(fwd_bwd, device, iters)
    out["backward_only_ms_est"] = out["forward_backward"]["median_ms"] - out["forward"]["median_ms"]
    return out


def _trimmed_cosine(ga: torch.Tensor, gb: torch.Tensor, q: float = 0.999) -> float:
    """Cosine of per-vertex gradients without the largest 0.1%: single degenerate
    (edge-on) triangles give huge barycentric gradients that dominate the plain cosine."""
    ga, gb = ga.reshape(-1, ga.shape[-1]).double(), gb.reshape(-1, gb.shape[-1]).double()
    m = torch.maximum(ga.norm(dim=-1), gb.norm(dim=-1))
    keep = m <= m.quantile(q)
    return float(torch.nn.functional.cosine_similarity(ga[keep].flatten(), gb[keep].flatten(), dim=0))


def compare(a: dict, b: dict) -> dict:
    cov_a, cov_b = a["rast"][..., 3] > 0, b["rast"][..., 3] > 0
    same_id = (a["rast"][..., 3] == b["rast"][..., 3]) & cov_a
    diff_img = (a["img"] - b["img"]).abs()[same_id]
    diff_aa = (a["aa"] - b["aa"]).abs()

    def cos(x, y):
        return float(torch.nn.functional.cosine_similarity(x.flatten().double(), y.flatten().double(), dim=0))

    return {
        "coverage_agreement": float((cov_a == cov_b).float().mean()),
        "covered_pixels": [int(cov_a.sum()), int(cov_b.sum())],
        "triangle_id_agreement_on_covered": float(same_id.sum() / (cov_a | cov_b).sum()),
        "bary_max_abs_err": float((a["rast"][..., :2] - b["rast"][..., :2]).abs()[same_id].max()),
        "interp_max_abs_err": float(diff_img.max()),
        "interp_mean_abs_err": float(diff_img.mean()),
        "aa_mean_abs_err": float(diff_aa.mean()),
        "aa_max_abs_err": float(diff_aa.max()),
        "grad_clip_xy_cosine": cos(a["g_clip"][..., :2], b["g_clip"][..., :2]),
        "grad_clip_cosine": cos(a["g_clip"], b["g_clip"]),
        "grad_clip_xy_cosine_trimmed": _trimmed_cosine(a["g_clip"][..., :2], b["g_clip"][..., :2]),
        "grad_colour_cosine": cos(a["g_col"], b["g_col"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--res", type=int, nargs="+", default=[512])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--freq", type=int, default=22, help="geodesic frequency: 20*freq^2 faces (22 -> 9680)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--no-nvdiffrast", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    use_nv = device.type == "cuda" and not args.no_nvdiffrast and nvdiffrast_available()[0]
    backends = {"torch": TorchMeshBackend()}
    if use_nv:
        from headavatar.render.mesh.nvdiffrast_backend import NvdiffrastBackend

        backends["nvdiffrast"] = NvdiffrastBackend(device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "nvdiffrast": use_nv if use_nv else nvdiffrast_available()[1],
        "results": {},
    }
    for res in args.res:
        scene = make_scene(res, args.batch, args.freq, device)
        topo = edge_topology(scene["faces"])
        entry = {"faces": int(scene["faces"].shape[0]), "timing": {}}
        outs = {}
        for name, be in backends.items():
            t = topo if name == "torch" else None
            entry["timing"][name] = time_backend(be, scene, res, device, args.iters, t)
            outs[name] = run_backend(be, scene, res, t)
        if use_nv:
            entry["parity"] = compare(outs["torch"], outs["nvdiffrast"])
            # Constant colour: position gradients come from antialiasing (silhouettes) alone.
            flat = dict(scene, colour=torch.ones_like(scene["colour"]))
            ga = run_backend(backends["torch"], flat, res, topo)["g_clip"][..., :2]
            gb = run_backend(backends["nvdiffrast"], flat, res)["g_clip"][..., :2]
            entry["parity"]["grad_clip_xy_cosine_silhouette_only"] = float(
                torch.nn.functional.cosine_similarity(ga.flatten().double(), gb.flatten().double(), dim=0)
            )
        report["results"][str(res)] = entry
        print(json.dumps({res: entry}, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
