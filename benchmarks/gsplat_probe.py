"""gsplat.rasterization called directly on an avatar's Gaussians, without headavatar's wrapper:
the floor that the wrapper's overhead is measured against (benchmarks/flashavatar_gpu.py)."""

from __future__ import annotations


def raw(g: dict, cams, bg, sh_degree):
    import gsplat

    colors = g["colors"][:, :, : (sh_degree + 1) ** 2] if sh_degree is not None else g["colors"][:, :, 0]
    return gsplat.rasterization(g["means"], g["quats"], g["scales"], g["opacities"], colors,
                                cams.viewmats[:, None], cams.K[:, None], cams.width, cams.height,
                                sh_degree=sh_degree, packed=False, backgrounds=bg[:, None], render_mode="RGB")
