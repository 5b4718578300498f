"""FLARE avatar -> TexturedMesh: the deformed mesh, baked material maps and expression morph targets.

The MESH capability of FlareAvatar (headavatar.methods.avatar.MeshAvatar);
headavatar.export writes the result as .glb or .obj.

What FLARE's model gives (headavatar.methods.flare.model.FlareModel):

* ``deformation()`` -> canonical vertices x_c [V,3] and, per vertex, learnt
  expression blendshapes E [V,3,Ne], pose correctives P and skinning weights W;
* ``posed(params, deformation)`` -> vertices of any frame (scaled units:
  divided by ``scale`` to get metres);
* ``shader.material(prior.normalize(x_c))`` -> albedo kd (linear RGB),
  roughness kr, specular intensity ko at canonical positions.

The exported mesh (metres, headavatar's world space):

* canonical (``params=None``): zero expression, every joint at rest, no
  translation.  There the skinning is the identity, so vertex k of the mesh
  with expression psi is exactly ``v_k + sum_e psi_e E[k,:,e]``: one morph target
  per learnt blendshape reproduces FLARE's expression deformation (pose --
  jaw, neck, eyes -- is not carried: glTF skinning is not exported);
* a tracked frame: the posed mesh of that frame, without morph targets.

Maps are baked by rasterising the UV layout and evaluating the material
network at the canonical position under every texel centre, then filling the
gutters.  UVs: the head model's own when the mesh still has its topology
(no remesh happened), otherwise a generated atlas (``atlas_uvs``).
"""

from __future__ import annotations

import numpy as np
import torch

from headavatar.errors import UserError
from headavatar.export.mesh import TexturedMesh, atlas_uvs, check_mesh_options, fill_gutters, split_uv_seams, uv_texel_samples, vertex_normals
from headavatar.headmodels.params import FrameParams
from headavatar.lighting.color import linear_to_srgb


def head_topology_uvs(model) -> tuple[np.ndarray, np.ndarray] | None:
    """(uvs [T,2], uv_faces [F,3]) of the head model if FLARE's mesh is still the head model's mesh, else None."""
    head = model.head
    hf = head.faces.detach().cpu()
    # FLARE starts from the head model's faces over its referenced vertices only (renumbered in order)
    used = torch.unique(hf)
    remap = torch.full((head.num_vertices,), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    faces0 = remap[hf]
    mf = model.faces.detach().cpu().long()
    if faces0.shape != mf.shape or not torch.equal(faces0, mf) or model.num_vertices != used.numel():
        return None  # remeshed: the head model's UVs no longer index these faces
    return head.uvs.detach().cpu().numpy(), head.uv_faces.detach().cpu().numpy()


def blend_names(model) -> list[str]:
    """Names of FLARE's blendshape channels: the head model's expressions, then its extras (e.g. eyelids)."""
    head = model.head
    E = model.prior.num_expr_model
    names = [head.expression_names[e] if e < len(head.expression_names) else f"expression_{e}" for e in range(E)]
    for k, n in model.prior.extras_sizes.items():
        names += [k] if n == 1 else [f"{k}_{i}" for i in range(n)]
    return names


@torch.no_grad()
def bake_materials(model, canon_points: torch.Tensor, chunk: int = 1 << 16) -> dict[str, torch.Tensor]:
    """Material network at canonical points [N,3] (scaled units) -> kd [N,3] linear, kr [N,1], ko [N,1]."""
    outs = {"kd": [], "kr": [], "ko": []}
    for s in range(0, canon_points.shape[0], chunk):
        kd, kr, ko = model.shader.material(model.prior.normalize(canon_points[s : s + chunk]))
        outs["kd"].append(kd)
        outs["kr"].append(kr)
        outs["ko"].append(ko)
    return {k: torch.cat(v) if v else canon_points.new_zeros(0, 3 if k == "kd" else 1) for k, v in outs.items()}


@torch.no_grad()
def textured_mesh(avatar, params: FrameParams | None = None, texture_size: int = 1024, uv: str = "auto", morph_targets: bool = True,
                  textures: bool = True) -> TexturedMesh:
    """The FLARE avatar as a TexturedMesh (see the module docstring).  ``params`` one frame's inputs, None = canonical."""
    check_mesh_options(texture_size, uv)
    model = avatar.model
    s = model.scale
    d = model.deformation()
    x_c = d[0]
    verts, normals = posed_vertices(avatar, params, d)
    faces = model.faces.detach().cpu().numpy()

    head_uv = head_topology_uvs(model) if uv in ("auto", "head") else None
    if uv == "head" and head_uv is None:
        raise UserError("--uv head: this FLARE mesh was remeshed and no longer has the head model's topology; use --uv atlas (or auto)")
    if head_uv is not None:
        vi, ti, new_faces = split_uv_seams(faces, head_uv[1])
        uvs = head_uv[0][ti]
    else:
        vi, uvs, new_faces = atlas_uvs(verts, faces, texture_size)

    maps = {}
    if textures:
        T = int(texture_size)
        face_of, bary, covered = uv_texel_samples(uvs, new_faces, T)
        xc = x_c.detach()
        vi_t = torch.as_tensor(vi, device=xc.device)
        f_t = torch.as_tensor(new_faces, device=xc.device)
        sel = np.flatnonzero(covered.reshape(-1))
        fid = torch.as_tensor(face_of.reshape(-1)[sel], device=xc.device)
        b = torch.as_tensor(bary.reshape(-1, 3)[sel], dtype=xc.dtype, device=xc.device)
        corners = xc[vi_t[f_t[fid]]]  # [N,3 corners,3]
        pts = (corners * b[..., None]).sum(1)
        mat = bake_materials(model, pts)

        def to_map(vals: torch.Tensor) -> np.ndarray:
            c = vals.shape[-1]
            img = np.zeros((T * T, c), np.float32)
            img[sel] = vals.float().cpu().numpy()
            img = fill_gutters(img.reshape(T, T, c), covered)
            return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

        maps = {"albedo": to_map(linear_to_srgb(mat["kd"].clamp(0, 1))),  # glTF/MTL colour maps are sRGB
                "roughness": to_map(mat["kr"])[..., 0], "specular": to_map(mat["ko"])[..., 0]}

    targets = []
    if morph_targets and params is None:
        E = (d[1] / s).float().cpu().numpy()  # [V,3,Ne]
        targets = [(n, E[vi, :, e]) for e, n in enumerate(blend_names(model))]
    mv = verts[vi]
    extras = {"source": "headavatar FLARE", "run": str(avatar.run.root), "checkpoint_step": int(avatar.step),
              "frame": "canonical" if params is None else "tracked", "units": "metres", "up": "+y", "uv": "head" if head_uv is not None else "atlas"}
    return TexturedMesh(mv, new_faces, uvs, normals[vi], morph_targets=targets, name=f"{avatar.subject.root.name}_flare", extras=extras,
                        source_index=vi, **maps)


@torch.no_grad()
def posed_vertices(avatar, params: FrameParams | None, deformation=None) -> tuple[np.ndarray, np.ndarray]:
    """FLARE's unsplit mesh at the canonical pose (None) or one frame's inputs: (vertices [V,3] in metres, normals [V,3])."""
    from headavatar.export.frames import neutral_params

    model = avatar.model
    params = neutral_params(avatar) if params is None else params
    verts = (model.posed(params, deformation)[0][0] / model.scale).float().cpu().numpy()
    return verts, vertex_normals(verts, model.faces.detach().cpu().numpy())  # normals before any UV split: seams stay smooth


def posed_mesh(avatar, base: TexturedMesh, params: FrameParams) -> TexturedMesh:
    """``base`` (from ``textured_mesh``) moved to one frame: same UVs and maps, no morph targets."""
    import dataclasses

    verts, normals = posed_vertices(avatar, params)
    vi = base.source_index
    return dataclasses.replace(base, vertices=verts[vi], normals=normals[vi], morph_targets=[], extras={**base.extras, "frame": "tracked"})
