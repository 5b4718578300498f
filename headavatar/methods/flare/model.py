"""The FLARE model: canonical mesh + offsets, deformation network, neural materials and light.

Units.  The reference works with FLAME scaled by 4 (camera about 4 units
away); its learning rates, prior thresholds and regulariser weights assume
that scale.  So the model works in *scaled* world units: every head-model
position and basis is multiplied by ``cfg.world_scale`` and every camera
translation too (which leaves the projection unchanged).

Deformation (IMavatar / FLARE, flare.md §2, §4).  A canonical vertex x_c
with predicted expression blendshapes E(x_c), pose correctives P(x_c) and
skinning weights W(x_c) over the head model's joints plus a ghost bone:

    x0 = T_can(W)^-1 x_c - E psi_can - P p_can        (undo the canonical pose and expression)
    x  = T(W) (x0 + E psi + P p) + translation

where T = sum_j W_j G_j is the linear blend of joint transforms (the ghost
bone is the identity), psi the expression (plus any post-skinning extras
of the head model, treated as more blendshapes) and p the pose features
(R_j - I, j >= 1).  The canonical pose opens the jaw by
``cfg.canonical_jaw_open``; the canonical expression is the mean training
expression.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from headavatar.constants import LABEL_IDS
from headavatar.headmodels.base import HeadModel
from headavatar.headmodels.params import FrameParams
from headavatar.headmodels.skinning import blend_shapes, blend_transforms, global_transforms, pose_features, transform_points
from headavatar.methods.flare.light import LightMLP
from headavatar.methods.flare.materials import MaterialMLP
from headavatar.methods.flare.shading import SplitSum, prepare_shading_normal, reflect
from headavatar.render.mesh.ops import face_normals, vertex_normals
from headavatar.utils.rotations import axis_angle_to_matrix

# Parsing labels (headavatar.subjects.format.LABELS) whose surface gets the skin F0 (FLARE's channels 0-2).
SKIN_F0_LABELS = tuple(LABEL_IDS[k] for k in ("skin", "brows", "eyes", "lips", "neck"))


class HeadPrior(nn.Module):
    """What the FLARE model takes from the head model, in scaled units.

    Buffers (so they follow .to()) but not persistent: rebuilt from the subject at load, never
    stored in checkpoints.
    """

    def __init__(self, head: HeadModel, shape: torch.Tensor, canonical_expression: torch.Tensor, cfg, canonical_extras: dict | None = None):
        super().__init__()
        s = float(cfg.world_scale)
        self.parents = list(head.parents)
        self.num_joints = head.num_joints
        self.extras_sizes = head.extras_sizes()
        E = head.num_expression if cfg.num_expression is None else min(cfg.num_expression, head.num_expression)
        self.num_expr_model = E
        dev = head.template.device
        shape = shape.reshape(1, -1).to(dev)
        expr_can = canonical_expression.reshape(1, -1)[:, :E].to(dev)
        rots_can = torch.zeros(1, head.num_joints, 3, device=dev)
        sign = head.jaw_open_sign()
        if sign != 0.0:
            rots_can[0, head.joint_index("jaw"), 0] = sign * cfg.canonical_jaw_open
        extras_can = {k: (canonical_extras or {}).get(k, torch.zeros(1, n)).reshape(1, n).to(dev) for k, n in self.extras_sizes.items()}
        expr_full = torch.zeros(1, head.num_expression, device=dev)
        expr_full[:, :E] = expr_can
        with torch.no_grad():
            verts = head(shape=shape, expression=expr_full, joint_rotations=rots_can, extras=extras_can)[0]
            # joints are regressed from the shaped mesh, expression included (HeadModel.forward, FLAME):
            # linear in the expression, so keep the identity part and the per-coefficient part
            joints_id = torch.einsum("jv,bvc->bjc", head.joint_regressor, head.shaped(shape))[0]
            joints_expr = torch.einsum("jv,vce->jce", head.joint_regressor, head.expr_basis[..., :E])
        R_can = axis_angle_to_matrix(rots_can)
        joints_can = joints_id + joints_expr @ expr_can[0]
        G_can = head.global_transforms(R_can, joints_can[None] * s)[0, :, :3]  # [J,3,4]
        # blendshape "expression" = expression coefficients ⊕ extras; bases to match
        bases = [head.expr_basis[..., :E]] + [head.post_basis[k] for k in self.extras_sizes]
        self.register_buffer("verts", verts * s, persistent=False)  # canonical head-model vertices [Vh,3]
        self.register_buffer("faces", head.faces.clone(), persistent=False)
        self.register_buffer("joints_id", joints_id * s, persistent=False)  # [J,3]
        self.register_buffer("joints_expr", joints_expr * s, persistent=False)  # [J,3,E]
        self.register_buffer("G_can", G_can, persistent=False)
        self.register_buffer("psi_can", torch.cat([expr_can] + [extras_can[k] for k in self.extras_sizes], -1)[0], persistent=False)
        self.register_buffer("pose_can", pose_features(R_can)[0], persistent=False)
        self.register_buffer("expr_basis", torch.cat(bases, -1) * s, persistent=False)  # [Vh,3,Ne]
        Np = 9 * (head.num_joints - 1)
        if head.pose_basis is not None:
            pb = head.pose_basis.reshape(Np, -1, 3).permute(1, 0, 2) * s  # [Vh,Np,3]
        else:
            pb = torch.zeros(head.num_vertices, Np, 3, device=dev)
        self.register_buffer("pose_basis", pb, persistent=False)
        self.register_buffer("skin_weights", F.pad(head.skin_weights, (1, 0)), persistent=False)  # ghost bone first, target 0
        self.register_buffer("skin_f0", _head_vertex_skin(head), persistent=False)  # [Vh] 1 = skin F0
        lo, hi = self.verts.min(0).values, self.verts.max(0).values
        pad = (hi - lo) * cfg.aabb_margin
        self.register_buffer("aabb", torch.stack([lo - pad, hi + pad]), persistent=False)

    def kdtree(self):
        """cKDTree of the canonical head-model vertices (CPU nearest-neighbour queries), built once."""
        if getattr(self, "_tree", None) is None:
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self.verts.detach().cpu().double().numpy())
        return self._tree

    @property
    def num_blend(self) -> int:
        return self.expr_basis.shape[-1]

    @property
    def num_pose(self) -> int:
        return self.pose_basis.shape[1]

    def frame_inputs(self, params: FrameParams, scale: float) -> dict:
        """Tracking params -> psi [B,Ne], p [B,Np], G [B,J+1,3,4] (ghost first), translation [B,3] (scaled)."""
        params = FrameParams.of(params)
        E = self.num_expr_model
        expr = params.expression[:, :E]
        B = expr.shape[0]
        extras = params.extras
        psi = torch.cat([expr] + [extras.get(k, expr.new_zeros(B, n)) for k, n in self.extras_sizes.items()], -1)
        R = axis_angle_to_matrix(params.joint_rotations)
        joints = self.joints_id[None] + torch.einsum("jce,be->bjc", self.joints_expr, expr)
        G = self.global_transforms(R, joints)
        ghost = torch.eye(3, 4, dtype=G.dtype, device=G.device).expand(B, 1, 3, 4)
        t = params.translation
        t = expr.new_zeros(B, 3) if t is None else t * scale
        return {"psi": psi, "pose": pose_features(R), "G": torch.cat([ghost, G], 1), "translation": t}

    def global_transforms(self, rots: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """The head model's joint transforms [B,J,3,4] (rest -> posed, scaled units)."""
        return global_transforms(self.parents, rots, joints)[..., :3, :]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical positions -> [0,1]³ over the (padded) canonical box."""
        return (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])


def _head_vertex_skin(head: HeadModel) -> torch.Tensor:
    """Per head-model vertex: fraction of its faces labelled as skin for F0."""
    V = head.num_vertices
    faces = head.faces.cpu()
    if head.face_labels is not None:
        fl = head.face_labels.cpu()
        skin_face = torch.zeros_like(fl, dtype=torch.float32)
        for lab in SKIN_F0_LABELS:
            skin_face[fl == lab] = 1.0
        acc = torch.zeros(V).index_add(0, faces.reshape(-1), skin_face.repeat_interleave(3))
        cnt = torch.zeros(V).index_add(0, faces.reshape(-1), torch.ones(faces.numel()))
        out = acc / cnt.clamp_min(1)
    else:
        out = torch.zeros(V)
        for r in ("face", "lips", "eyes", "neck"):
            if r in head.regions:
                out[torch.as_tensor(head.regions[r])] = 1.0
        if "hair" in head.regions:
            out[torch.as_tensor(head.regions["hair"])] = 0.0
    return out.to(head.template.device)


# ------------------------------------------------------------------ networks
class _WNLinear(nn.Module):
    """Weight-normalised Linear with the reference init N(0, sqrt(2)/sqrt(out)), zero bias."""

    def __init__(self, din: int, dout: int, zero: bool = False):
        super().__init__()
        lin = nn.Linear(din, dout)
        if zero:
            nn.init.zeros_(lin.weight)
        else:
            nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(dout))
        nn.init.zeros_(lin.bias)
        self.lin = lin if zero else nn.utils.parametrizations.weight_norm(lin)

    def forward(self, x):
        return self.lin(x)


class DeformerNet(nn.Module):
    """Canonical xyz -> expression blendshapes [V,3,Ne], pose correctives [V,Np,3], skinning weights [V,J+1]."""

    def __init__(self, num_blend: int, num_pose: int, num_bones: int, width: int = 128, layers: int = 4, sharpness: float = 20.0):
        super().__init__()
        self.num_blend, self.num_pose, self.num_bones, self.sharpness = num_blend, num_pose, num_bones, sharpness
        dims = [3] + [width] * layers
        self.trunk = nn.ModuleList(_WNLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.blend = nn.Linear(width, 3 * (num_blend + num_pose))
        nn.init.zeros_(self.blend.weight)
        nn.init.zeros_(self.blend.bias)
        self.skin_hidden = _WNLinear(width, width)
        self.skin_out = nn.Linear(width, num_bones)
        nn.init.zeros_(self.skin_out.weight)  # uniform weights at the start
        nn.init.zeros_(self.skin_out.bias)
        self.act = nn.Softplus(beta=100)

    def forward(self, x: torch.Tensor):
        h = x
        for lin in self.trunk:
            h = self.act(lin(h))
        V = x.shape[0]
        bs = self.blend(h)
        E = bs[:, : 3 * self.num_blend].reshape(V, 3, self.num_blend)
        P = bs[:, 3 * self.num_blend :].reshape(V, self.num_pose, 3)
        W = torch.softmax(self.sharpness * self.skin_out(self.act(self.skin_hidden(h))), -1)
        return E, P, W


def deform(x_c: torch.Tensor, E: torch.Tensor, P: torch.Tensor, W: torch.Tensor, prior: HeadPrior, frame: dict) -> torch.Tensor:
    """Canonical vertices [V,3] -> posed [B,V,3] (see the module docstring)."""
    ghost = torch.eye(3, 4, dtype=x_c.dtype, device=x_c.device)[None]
    Gc = torch.cat([ghost, prior.G_can], 0)  # [J+1,3,4]
    Tc = blend_transforms(W, Gc)
    x0 = torch.linalg.solve(Tc[:, :, :3], (x_c - Tc[:, :, 3])[..., None])[..., 0]
    x0 = x0 - E @ prior.psi_can - torch.einsum("p,vpc->vc", prior.pose_can, P)
    xb = x0[None] + blend_shapes(E, frame["psi"]) + torch.einsum("bp,vpc->bvc", frame["pose"], P)
    return transform_points(blend_transforms(W, frame["G"]), xb) + frame["translation"][:, None]


class Shader(nn.Module):
    """Material MLP (+ the neural light used in training)."""

    def __init__(self, encoding: str, cfg):
        super().__init__()
        self.material = MaterialMLP(encoding, cfg)
        self.light = LightMLP(cfg.light_width, cfg.light_layers, cfg.light_activation, cfg.ide_attenuation, cfg.light_init_bias)


# ------------------------------------------------------------------ the model
class FlareModel(nn.Module):
    def __init__(self, head: HeadModel, cfg, shape: torch.Tensor, canonical_expression: torch.Tensor, canonical_extras: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.head = head
        self.scale = float(cfg.world_scale)
        self.prior = HeadPrior(head, shape, canonical_expression, cfg, canonical_extras)
        self.register_buffer("shape", shape.reshape(1, -1).float())
        V0, F0 = _initial_mesh(self.prior.verts, self.prior.faces)
        self.register_buffer("base_verts", V0)
        self.register_buffer("faces", F0)
        self.offsets = nn.Parameter(torch.zeros_like(V0))
        self.register_buffer("vskin", self._vertex_skin(V0), persistent=False)
        self.deformer = DeformerNet(self.prior.num_blend, self.prior.num_pose, head.num_joints + 1, cfg.deformer_width, cfg.deformer_layers,
                                    cfg.skinning_sharpness)
        self.shader = Shader("pe", cfg)
        from headavatar.methods.flare.losses import AdaptiveRobustLoss

        self.robust = AdaptiveRobustLoss(4)  # albedo smoothness (kd, kr); its shape/scale are trained
        self.stage = 1
        self._topology = None
        self._split_sum = None
        self._backend = None

    # ------------------------------------------------------------ mesh state
    @property
    def num_vertices(self) -> int:
        return self.base_verts.shape[0]

    def canonical_vertices(self) -> torch.Tensor:
        return self.base_verts + self.offsets

    def set_mesh(self, verts: torch.Tensor, faces: torch.Tensor) -> None:
        """Replace the canonical mesh (remesh / checkpoint load); offsets restart at zero."""
        dev = self.base_verts.device
        self.base_verts = verts.to(dev, torch.float32)
        self.faces = faces.to(dev, torch.int64)
        self.offsets = nn.Parameter(torch.zeros_like(self.base_verts))
        self.vskin = self._vertex_skin(self.base_verts)
        self._topology = None

    def enter_stage2(self) -> None:
        """A new shader with hash-grid materials (and, as the reference, a new light unless configured otherwise)."""
        old_light = self.shader.light
        dev = self.base_verts.device
        self.shader = Shader("hash", self.cfg).to(dev)
        if not self.cfg.stage2_new_light:
            self.shader.light = old_light
        self.stage = 2

    def _vertex_skin(self, verts: torch.Tensor) -> torch.Tensor:
        """[V] skin-ness of each canonical vertex (that of its nearest head-model vertex), for F0."""
        idx = nearest_vertices(verts.detach(), self.prior.verts).to(verts.device)
        return self.prior.skin_f0[idx]

    # ------------------------------------------------------------ components
    def backend(self):
        if self._backend is None:
            from headavatar.render.mesh import get_mesh_backend

            name = self.cfg.mesh_backend
            if name == "auto" and self.cfg.backend not in ("auto", None):
                name = self.cfg.backend
            self._backend = get_mesh_backend(name, self.base_verts.device)
        return self._backend

    def split_sum(self) -> SplitSum:
        if self._split_sum is None or self._split_sum.lut.device != self.base_verts.device:
            self._split_sum = SplitSum(self.base_verts.device, self.cfg.lut_size, self.cfg.lut_samples)
        return self._split_sum

    def topology(self) -> torch.Tensor:
        if self._topology is None:
            from headavatar.render.mesh.torch_ref import edge_topology

            self._topology = edge_topology(self.faces)
        return self._topology

    # ------------------------------------------------------------ forward
    def deformation(self):
        x_c = self.canonical_vertices()
        E, P, W = self.deformer(x_c)
        return x_c, E, P, W

    def posed(self, params: FrameParams, deformation=None) -> tuple[torch.Tensor, tuple]:
        d = deformation if deformation is not None else self.deformation()
        frame = self.prior.frame_inputs(params, self.scale)
        return deform(d[0], d[1], d[2], d[3], self.prior, frame), d

    def scaled_cameras(self, cameras):
        from headavatar.camera import Cameras

        return Cameras(cameras.K, cameras.R, cameras.t * self.scale, cameras.height, cameras.width)

    def f0(self, skin: torch.Tensor) -> torch.Tensor:
        if self.stage == 1:
            return torch.full_like(skin, self.cfg.f0_stage1)
        return self.cfg.f0_other + (self.cfg.f0_skin - self.cfg.f0_other) * skin

    def render(self, params: FrameParams, cameras, light=None, deformation=None, intrinsics: bool = False, light_frame: str = "world",
               material_scale: torch.Tensor | None = None) -> dict:
        """Render frames. ``light``: None (the neural light) or an EnvironmentLight (relighting).

        ``material_scale`` [3]: multiplies the albedo (per channel) and the specular intensity (by
        its mean): the exposure calibration of headavatar.methods.flare.calibration.

        ``light_frame``: "world" (light fixed in the room) or "head" (the light
        turns with the head's root joint: lookups use head-frame directions).

        Returns ``rgb`` [B,H,W,3] linear radiance premultiplied by ``alpha``
        [B,H,W,1] (antialiased coverage) on black, plus per covered pixel
        (flat index ``pix``) the G-buffer and shading terms the losses use.
        """
        H, W = cameras.height, cameras.width
        cams = self.scaled_cameras(cameras)
        verts, d = self.posed(params, deformation)
        x_c = d[0]
        B = verts.shape[0]
        with torch.no_grad():
            depth = cams.world_to_camera(verts)[..., 2]
            dmin, dmax = torch.stack([depth.min(), depth.max()]).tolist()  # one host sync
            near = max(dmin * self.cfg.near_far[0], 1e-3)
            far = max(dmax * self.cfg.near_far[1], near * 2)
        clip = cams.to_clip(verts, near, far)
        be = self.backend()
        rast = be.rasterize(clip, self.faces, (H, W))
        vn = vertex_normals(verts, self.faces)
        attrs = torch.cat([x_c[None].expand(B, -1, -1), verts, vn, self.vskin[None, :, None].expand(B, -1, 1)], -1)
        gb = be.interpolate(attrs, rast, self.faces)  # [B,H,W,10]
        tri = rast[..., 3].reshape(-1)
        pix = (tri > 0).nonzero().squeeze(1)
        g = gb.reshape(-1, gb.shape[-1]).index_select(0, pix)
        face = tri.index_select(0, pix).detach().long() - 1
        b = torch.div(pix, H * W, rounding_mode="floor")
        fn = face_normals(verts, self.faces)  # [B,F,3]
        geom_n = fn[b, face]
        pos = g[:, 3:6]
        centers = cams.centers  # [B,3] in scaled units
        view = F.normalize(centers[b] - pos, dim=-1)
        n = prepare_shading_normal(g[:, 6:9], geom_n, view)
        kd, kr, ko = self.shader.material(self.prior.normalize(g[:, 0:3]))
        if material_scale is not None:
            ms = torch.as_tensor(material_scale, dtype=kd.dtype, device=kd.device)
            kd, ko = kd * ms, ko * ms.mean()
        n_dot_v = (n * view).sum(-1, keepdim=True).clamp(1e-4, 1.0)
        refl = reflect(view, n)
        n_l, r_l = to_light_frame(light_frame, params, b, n, refl)
        if light is None:
            D, S = self.shader.light.both(n_l, r_l, kr)
        else:
            D = light.diffuse(n_l)
            S = light.specular(r_l, kr)
        f0 = self.f0(g[:, 9:10])
        sh = self.split_sum().shade(kd, kr, ko, f0, D, S, n_dot_v)
        color = torch.cat([sh["rgb"], torch.ones_like(kr)], -1)
        img = torch.zeros(B * H * W, 4, dtype=color.dtype, device=color.device).index_put((pix,), color).reshape(B, H, W, 4)
        img = be.antialias(img, rast, clip, self.faces, topology=self.topology()) if _takes_topology(be) else be.antialias(img, rast, clip, self.faces)
        out = {
            "rgb": img[..., :3], "alpha": img[..., 3:4].clamp(0, 1), "pix": pix, "rast": rast, "face": face,
            "kd": kd, "kr": kr, "ko": ko, "diffuse": D, "specular": S, "n": n, "verts": verts,
            "x_c": x_c, "E": d[1], "P": d[2], "W": d[3], "f0": f0,
        }
        if intrinsics:
            out["diffuse_shading"] = sh["diffuse_shading"]
            out["specular_shading"] = sh["specular_shading"]
        return out


def to_light_frame(frame: str, params: FrameParams, batch_of: torch.Tensor, *dirs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """World directions [N,3] -> the light's frame: unchanged for "world"; for "head" (the light turns with
    the head) R^T d with the root rotation of each direction's frame (``batch_of`` [N])."""
    if frame == "world":
        return dirs
    if frame != "head":
        raise ValueError(f"light_frame must be world or head, not {frame!r}")
    R = axis_angle_to_matrix(params.joint_rotations[:, 0])[batch_of]  # [N,3,3] head -> world
    return tuple(torch.einsum("nij,ni->nj", R, d) for d in dirs)


def _takes_topology(backend) -> bool:
    return getattr(backend, "name", "") == "torch"


def _initial_mesh(verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-model mesh without unreferenced vertices (the reference drops FLAME's unused ones)."""
    used = torch.unique(faces)
    remap = torch.full((verts.shape[0],), -1, dtype=torch.int64, device=faces.device)
    remap[used] = torch.arange(used.numel(), device=faces.device)
    return verts[used].clone(), remap[faces]


def nearest_vertices(x: torch.Tensor, ref: torch.Tensor, chunk: int = 4096, tree=None) -> torch.Tensor:
    """Index of the nearest ``ref`` point for every ``x`` point (no gradient); ``tree``: a cKDTree of ref to reuse."""
    x, ref = x.detach(), ref.detach()
    if x.device.type == "cpu":
        if tree is None:
            from scipy.spatial import cKDTree

            tree = cKDTree(ref.double().numpy())
        _, idx = tree.query(x.double().numpy())
        return torch.as_tensor(idx, dtype=torch.int64)
    out = []
    for s in range(0, x.shape[0], chunk):
        out.append(torch.cdist(x[s : s + chunk], ref).argmin(1))
    return torch.cat(out)


def nearest_with_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 4096, tree=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of the nearest ``ref`` point for every ``x`` point."""
    idx = nearest_vertices(x, ref, chunk, tree).to(x.device)
    d2 = (x.detach() - ref.detach()[idx]).square().sum(-1)
    return idx, d2


__all__ = ["FlareModel", "HeadPrior", "DeformerNet", "deform", "nearest_vertices", "nearest_with_distance",
           "to_light_frame"]
