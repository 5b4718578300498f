"""The FlashAvatar model: UV-embedded Gaussians moved by an expression-conditioned MLP."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from headavatar.errors import UserError
from headavatar.headmodels.base import HeadModel
from headavatar.headmodels.params import FrameParams
from headavatar.log import get_logger
from headavatar.methods.flashavatar.config import DEFAULT_SHELL_REGION, FlashAvatarConfig
from headavatar.methods.flashavatar.embedding import barycentric_points, positional_encoding, sample_uv_texels
from headavatar.render.gaussians import RenderOutput, render_gaussians
from headavatar.utils.rotations import axis_angle_to_6d, axis_angle_to_matrix, matrix_to_6d, quaternion_multiply

_log = get_logger(__name__)


class DeformMLP(nn.Module):
    """Linear(in,W) + (L-1) x Linear(W,W), ReLU after each, then Linear(W,10); outputs tanh'd.

    The first layer is split in two (position encoding / condition) so the
    per-Gaussian part and the per-frame part are multiplied separately: the
    same function as one Linear on the concatenation, without materialising
    a [B,N,171] input.
    """

    def __init__(self, pe_dim: int, cond_dim: int, width: int, layers: int):
        super().__init__()
        self.pe_in = nn.Linear(pe_dim, width)
        self.cond_in = nn.Linear(cond_dim, width, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        self.out = nn.Linear(width, 10)
        # nn.Linear's default init on the full fan-in, as one Linear(pe_dim + cond_dim, W) would get
        bound = 1 / math.sqrt(pe_dim + cond_dim)
        for lin in (self.pe_in, self.cond_in):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.uniform_(self.pe_in.bias, -bound, bound)

    def forward(self, pe: torch.Tensor, cond: torch.Tensor, masks: torch.Tensor | None = None, group: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """pe [N,P], cond [B,C] -> [B,N,10] in (-1,1).

        Regional conditioning: ``masks`` [U,C] (the distinct condition masks) and ``group`` [N]
        (each Gaussian's mask): Gaussian n sees cond * masks[group[n]].  The per-frame Linear runs
        once per distinct mask ([B,U,W]) and is gathered per Gaussian.  ``dtype``: the autocast dtype
        the caller runs this under (None: none), for the fused hidden layers of a no-grad call.
        """
        if masks is None:
            c = self.cond_in(cond)[:, None]
        else:
            c = self.cond_in(cond[:, None, :] * masks[None])[:, group]
        h = torch.relu(self.pe_in(pe)[None] + c)
        for lin in self.hidden:
            h = _linear_relu(lin, h, dtype)
        return torch.tanh(self.out(h))


def _linear_relu(lin: nn.Linear, h: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """relu(lin(h)).  Where nothing needs a gradient (rendering), one matmul whose epilogue adds the
    bias and applies the ReLU (cuBLASLt on CUDA): a frame skips one pass over the [B, N, W]
    activations per layer and one CUDA-graph node.  Same values (ReLU commutes with the rounding).
    ``dtype`` comes from the caller, not from autocast's state: torch.compile traces this too."""
    if torch.is_grad_enabled() and (h.requires_grad or lin.weight.requires_grad):
        return torch.relu(lin(h))
    dt = h.dtype if dtype is None else dtype
    x = h.to(dt).reshape(-1, h.shape[-1])
    out = torch._addmm_activation(lin.bias.to(dt), x, lin.weight.to(dt).t())
    return out.view(*h.shape[:-1], out.shape[-1])


class FlashAvatarModel(nn.Module):
    # the Gaussians of frames that need no gradient: "torch" (nn.Linear chain, then the assembly) or "triton"
    # (MLP and assembly in one kernel, mlp_triton.py; set by FlashAvatarAvatar's fuse_frame="triton")
    mlp_kernel: Literal["torch", "triton"] = "torch"

    def __init__(self, head: HeadModel, cfg: FlashAvatarConfig, shape: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.head = head
        face_idx, bary = sample_uv_texels(head, cfg.uv_resolution, cfg.exclude_boundary)
        self.register_buffer("shape", shape.reshape(1, -1).float())
        with torch.no_grad():
            canonical = head.shaped(self.shape)  # identity only: zero expression, rest pose
        shell = None
        if cfg.shell_layers > 0:
            face_idx, bary, shell = shell_gaussians(head, canonical[0], face_idx, bary, cfg)
        self.register_buffer("face_idx", face_idx)
        self.register_buffer("bary", bary)
        with torch.no_grad():
            mu_t = barycentric_points(canonical, head.faces, face_idx, bary)[0]
        # shell Gaussians (coverage off the surface): a learnable distance along the triangle's normal
        self.normal_offset = None
        if shell is not None:
            init, sign = shell
            self.register_buffer("normal_sign", sign)
            self.normal_offset = nn.Parameter(init)
            # their canonical position (the MLP's input) sits off the surface too, so layers differ
            mu_t = mu_t + init[:, None] * face_normals(canonical, head.faces, face_idx, sign)[0]
        self.register_buffer("mu_t", mu_t)
        self.register_buffer("pe", positional_encoding(mu_t, cfg.pe_frequencies))
        # head pose (6D rotation of the root joint) appended to the condition when asked
        self.pose_dim = 6 if cfg.condition_pose == "root" else 0
        self.mlp = DeformMLP(self.pe.shape[1], head.condition_dim + self.pose_dim, cfg.mlp_width, cfg.mlp_layers)
        # [2, C]: the training frames' lowest and highest condition entries (set by set_condition_range;
        # infinite = no clamp, e.g. a checkpoint from before this field existed)
        cdim = head.condition_dim + self.pose_dim
        self.register_buffer("cond_range", torch.stack([torch.full((cdim,), -math.inf), torch.full((cdim,), math.inf)]))
        # neck anchoring: per-vertex weight of the torso's pose (derived, not saved) and the anchor
        # rotation of the root joint (saved; set by set_pose_anchor when training starts)
        self.register_buffer("torso_w", None, persistent=False)
        if cfg.neck_anchor == "train_mean":  # "auto" is resolved per subject by build.resolved_config
            w = torso_weights(head, canonical[0])
            if w is None:
                _log.info("head model '%s' has no 'neck' and 'boundary' regions: no neck anchoring", head.name)
            else:
                self.register_buffer("torso_w", w * (1.0 - cfg.neck_anchor_follow), persistent=False)
                self.register_buffer("neck_anchor", torch.zeros(3))
                # A^T of the anchor (derived from neck_anchor by _update_anchor_matrix, not saved)
                self.register_buffer("neck_anchor_mt", torch.eye(3), persistent=False)
                # kept in step with neck_anchor however the state is loaded (this module or a parent)
                self.register_load_state_dict_post_hook(_refresh_anchor_matrix)
        # derived from the head model, so not saved in checkpoints (recomputed on load)
        masks = group = None
        if cfg.condition_regions in ("basis", "static"):
            masks, group = condition_masks(head, face_idx, cfg.region_threshold, only_static=cfg.condition_regions == "static")
            if self.pose_dim:  # head pose reaches every Gaussian: hair and scalp see it alone
                masks = torch.cat([masks, masks.new_ones(masks.shape[0], self.pose_dim)], 1)
        self.register_buffer("cond_masks", masks, persistent=False)
        self.register_buffer("cond_group", group, persistent=False)
        if cfg.zero_init_deform:
            # tanh(0) = 0: Gaussians start on the tracked surface and the MLP learns a residual
            nn.init.zeros_(self.mlp.out.weight)
            nn.init.zeros_(self.mlp.out.bias)
        n = mu_t.shape[0]
        k_rest = (cfg.sh_degree + 1) ** 2 - 1
        self.sh_dc = nn.Parameter(torch.zeros(n, 1, 3))
        self.sh_rest = nn.Parameter(torch.zeros(n, k_rest, 3))
        p = cfg.init_opacity
        self.opacity_logit = nn.Parameter(torch.full((n,), math.log(p / (1 - p))))
        self.log_scale = nn.Parameter(torch.full((n, 3), math.log(1e-3)))
        self.rotation = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))

    def _mlp_bf16(self, device: torch.device) -> bool:
        p = self.cfg.mlp_precision
        return p == "bf16" or (p == "auto" and device.type == "cuda")

    @property
    def num_gaussians(self) -> int:
        return self.mu_t.shape[0]

    # --------------------------------------------------------------- frames
    def frame_inputs(self, params: FrameParams, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tracking params (Tracking.params) -> (condition [B,C], posed vertices [B,V,3]); gradients reach
        the tracking only with ``grad`` (tracking refinement, refine.py).  The identity is the model's own."""
        params = FrameParams.of(params)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            params = params.replace(shape=self.shape.expand(params.batch_size, -1))
            if self.torso_w is None:
                verts, rots = self.head(params, return_rotations=True)
            else:
                verts, joints, rots = self.head(params, return_joints=True, return_rotations=True)
                rot = rots[:, 0]
                # the root's rotation left-multiplies every joint's transform (pose correctives leave
                # it out), so the same frame posed with the anchor rotation A is one rigid turn
                # T = A R^T about the posed root joint away: no second head-model evaluation.  As row
                # vectors, anchored - v = (v - root)(T^T - I) = (v - root)(R A^T - I); five kernels, as
                # this runs in every frame (the CUDA graph of an unfused frame replays each one)
                root = joints[:, :1]
                step = rot @ self.neck_anchor_mt
                step.diagonal(dim1=-2, dim2=-1).sub_(1.0)
                verts = torch.addcmul(verts, self.torso_w[None, :, None], torch.bmm(verts - root, step))
            cond = self._condition(params, rots)
            if self.cfg.condition_clamp == "train_range":
                cond = torch.clamp(cond, self.cond_range[0], self.cond_range[1])  # one operation (lo <= hi always)
        return cond, verts

    @torch.no_grad()
    def set_condition_range(self, params: FrameParams, chunk: int = 256) -> None:
        """Store the per-entry range of the condition over these (training) frames."""
        params = FrameParams.of(params)
        lo = hi = None
        for s in range(0, params.batch_size, chunk):
            c = self._condition(params[s : s + chunk])
            lo = c.min(0).values if lo is None else torch.minimum(lo, c.min(0).values)
            hi = c.max(0).values if hi is None else torch.maximum(hi, c.max(0).values)
        self.cond_range.copy_(torch.stack([lo, hi]))

    @torch.no_grad()
    def set_pose_anchor(self, params: FrameParams) -> None:
        """The neck's anchor: the mean head rotation (root joint, axis-angle) of these (training) frames."""
        if self.torso_w is not None:
            self.neck_anchor.copy_(FrameParams.of(params).joint_rotations[:, 0].mean(0))
            self._update_anchor_matrix()

    @torch.no_grad()
    def _update_anchor_matrix(self) -> None:
        self.neck_anchor_mt.copy_(axis_angle_to_matrix(self.neck_anchor).T)

    def noisy_condition(self, cond: torch.Tensor, fraction: float) -> torch.Tensor:
        """``cond`` plus Gaussian noise whose std per entry is ``fraction`` of the training range of that
        entry (training-time augmentation, config ``condition_noise``); no range stored: no noise."""
        span = (self.cond_range[1] - self.cond_range[0]).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        return cond + torch.randn_like(cond) * (fraction * span)

    def _condition(self, params: FrameParams, rots: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's condition [B,C] before any clamp: the head model's, plus the head pose when asked.
        ``rots``: the joints' rotation matrices where the head model's forward gave them."""
        cond = self.head.condition(params.expression, params.joint_rotations, params.extras or None, rotations=rots)
        if self.pose_dim:
            root6d = axis_angle_to_6d(params.joint_rotations[:, 0]) if rots is None else matrix_to_6d(rots[:, 0])
            cond = torch.cat([cond, root6d], -1)
        return cond

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "cond_range" not in state_dict:  # a checkpoint from before the range was stored: no clamp
            inf = torch.full_like(self.cond_range[0], math.inf)
            state_dict = {**state_dict, "cond_range": torch.stack([-inf, inf])}
        if self.torso_w is not None and "neck_anchor" not in state_dict:  # trained without it: keep it off
            _log.info("checkpoint has no neck anchor (trained with neck_anchor=off): the neck turns with the head")
            self.torso_w = self.neck_anchor_mt = None
            del self.neck_anchor
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def gaussians(self, cond: torch.Tensor, verts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-frame Gaussians [B,N,...] from the condition and the posed mesh."""
        B = cond.shape[0]
        colors = torch.cat([self.sh_dc, self.sh_rest], 1)[None].expand(B, -1, -1, -1)
        opac = torch.sigmoid(self.opacity_logit)[None].expand(B, -1)
        bf16 = self._mlp_bf16(cond.device)
        # one Triton kernel (MLP and assembly) where nothing needs a gradient; in bf16 on CUDA (its fp32
        # weight tiles do not fit shared memory at width 256), fp32 only in Triton's CPU interpreter
        if (self.mlp_kernel == "triton" and (bf16 or cond.device.type != "cuda")
                and not (torch.is_grad_enabled() and (cond.requires_grad or verts.requires_grad or self.mlp.out.weight.requires_grad))):
            from headavatar.methods.flashavatar.mlp_triton import gaussians_triton

            g = gaussians_triton(self, cond, verts, dtype=torch.bfloat16 if bf16 else torch.float32)
            return {**g, "opacities": opac, "colors": colors}
        mu_m = barycentric_points(verts, self.head.faces, self.face_idx, self.bary)
        if self.normal_offset is not None:
            mu_m = mu_m + self.normal_offset[None, :, None] * face_normals(verts, self.head.faces, self.face_idx, self.normal_sign)
        with torch.autocast(cond.device.type, dtype=torch.bfloat16, enabled=bf16):
            o = self.mlp(self.pe, cond, self.cond_masks, self.cond_group, dtype=torch.bfloat16 if bf16 else None)
        o = o.float()
        means = mu_m + self.cfg.offset_scale * o[..., 0:3]
        dq = torch.cat([torch.exp(o[..., 3:4]), o[..., 4:7]], -1)  # not normalised, as the reference
        quats = quaternion_multiply(self.rotation[None].expand(B, -1, -1), dq)
        # scale exponent c in [1/e, e] applied to the log scale: s = s_base^c
        scales = torch.exp(torch.exp(o[..., 7:10]) * self.log_scale[None])
        return {"means": means, "quats": quats, "scales": scales, "opacities": opac, "colors": colors}

    def render(self, g: dict, cameras, background: torch.Tensor, sh_degree: int | None = None, backend: str = "auto",
               render_depth: bool = True, viewmats: torch.Tensor | None = None) -> RenderOutput:
        """Rasterise ``g``; colours are SH coefficients [B,N,K,3] (``sh_degree``: the model's when None)
        or, already evaluated for these cameras, RGB [B,N,3].  ``viewmats``: ``cameras.viewmats`` where the
        caller has built them already (a replayed frame then builds them once)."""
        B = g["means"].shape[0]
        bg = background.to(g["means"]).view(1, 3).expand(B, 3)
        if g["colors"].dim() == 3:
            deg, colors = None, g["colors"]
        else:
            deg = self.cfg.sh_degree if sh_degree is None else sh_degree
            colors = g["colors"][:, :, : (deg + 1) ** 2]
        return render_gaussians(
            g["means"], g["quats"], g["scales"], g["opacities"], colors,
            cameras.viewmats if viewmats is None else viewmats, cameras.K, cameras.width, cameras.height, sh_degree=deg,
            backgrounds=bg, backend=backend,
            render_depth=render_depth,
        )

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def initialize_from_frame(self, params: FrameParams) -> None:
        """Reference init: isotropic scale from the 3 nearest neighbours of the first frame's Gaussians."""
        cond, verts = self.frame_inputs(FrameParams.of(params)[0])
        if self.cfg.init_with_mlp_offsets:
            pts = self.gaussians(cond, verts)["means"][0]
        else:
            pts = barycentric_points(verts, self.head.faces, self.face_idx, self.bary)[0]
        d2 = mean_sq_knn_distance(pts.detach().cpu().double().numpy(), k=3)
        scale = np.sqrt(np.clip(d2, 1e-7, None))
        self.log_scale.copy_(torch.from_numpy(np.log(scale)).float()[:, None].expand(-1, 3))


def _refresh_anchor_matrix(module: "FlashAvatarModel", incompatible_keys) -> None:
    if module.torso_w is not None:
        module._update_anchor_matrix()


def torso_weights(head: HeadModel, canonical: torch.Tensor) -> torch.Tensor | None:
    """Per-vertex weight [V] of the torso's pose: 0 off the neck, rising smoothly across the 'neck'
    region from its top edge (next to the face) to 1 at the mesh's lower rim ('boundary').  None when
    the head model lacks either region."""
    if "neck" not in head.regions or "boundary" not in head.regions:
        return None
    from scipy.spatial import cKDTree

    p = canonical.detach().cpu().double().numpy()
    neck = np.zeros(len(p), bool)
    neck[np.asarray(head.regions["neck"])] = True
    rim = np.asarray(head.regions["boundary"])
    d_top, _ = cKDTree(p[~neck]).query(p[neck])  # to the nearest vertex above the neck
    d_rim, _ = cKDTree(p[rim]).query(p[neck])
    t = d_top / np.maximum(d_top + d_rim, 1e-12)
    w = np.zeros(len(p))
    w[neck] = t * t * (3 - 2 * t)  # smoothstep: no kink where the neck meets the face or the rim
    w[rim] = 1.0
    return torch.from_numpy(w).float().to(canonical.device)


def face_normals(verts: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Unit normals [B,N,3] of the triangles ``face_idx`` of ``verts`` [B,V,3], times ``sign`` [N] (outward)."""
    tri = faces[face_idx]
    v0, v1, v2 = verts[:, tri[:, 0]], verts[:, tri[:, 1]], verts[:, tri[:, 2]]
    n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12) * sign[None, :, None]


def shell_gaussians(head: HeadModel, canonical: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor, cfg):
    """Add ``shell_layers`` copies of the Gaussians on the ``shell_regions`` triangles, bound to the same
    triangle and barycentrics (binding inheritance) but starting k x ``shell_spacing`` out along its
    normal.  Returns (face_idx, bary, (initial normal distance [N], outward sign [N])), or
    (face_idx, bary, None) when the head model has no region of the default name (no shell)."""
    names = [r.strip() for r in cfg.shell_regions.split(",") if r.strip()]
    bad = [r for r in names if r not in head.regions]
    if bad and names == [DEFAULT_SHELL_REGION]:
        # the default asks for the hair region; a head model without one simply gets no shell
        _log.info("head model '%s' has no '%s' region: no shell Gaussians", head.name, DEFAULT_SHELL_REGION)
        return face_idx, bary, None
    if bad:
        raise UserError(f"shell_regions names regions {bad} the head model '{head.name}' lacks; it has {sorted(head.regions)}")
    in_region = torch.zeros(len(face_idx), dtype=torch.bool, device=face_idx.device)
    for r in names:
        in_region |= head.region_face_mask(r, mode="any").to(face_idx.device)[face_idx]
    sel = torch.nonzero(in_region).squeeze(1)
    n0 = len(face_idx)
    dist = [torch.zeros(n0)]
    fi, ba = [face_idx], [bary]
    for k in range(1, cfg.shell_layers + 1):
        fi.append(face_idx[sel])
        ba.append(bary[sel])
        dist.append(torch.full((len(sel),), k * cfg.shell_spacing))
    face_idx, bary, dist = torch.cat(fi), torch.cat(ba), torch.cat(dist).to(bary)
    # outward = away from the head's centre (the winding of a model's triangles is not relied on)
    ones = torch.ones(len(face_idx), device=bary.device)
    n = face_normals(canonical[None], head.faces, face_idx, ones)[0]
    p = barycentric_points(canonical[None], head.faces, face_idx, bary)[0]
    sign = torch.where(((p - canonical.mean(0)) * n).sum(-1) >= 0, 1.0, -1.0)
    return face_idx, bary, (dist, sign)


def condition_masks(head: HeadModel, face_idx: torch.Tensor, threshold: float, only_static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Which condition entries can move each Gaussian, from the head model itself.

    An expression (or post-skinning extra) entry moves a vertex when its blendshape displaces the
    vertex by more than ``threshold`` x that blendshape's largest displacement; a condition joint
    (its 6 rotation entries) moves the vertices it skins with weight above ``threshold``.  A
    Gaussian sees the entries that move any vertex of its triangle.  Returns the distinct masks
    [U,C] (float 0/1) and each Gaussian's mask index [N].  ``only_static``: a Gaussian moved by any
    entry keeps the whole condition; only those no entry moves (hair, scalp, neck) lose it.
    """
    V = head.num_vertices
    cols = []
    for name, n in head.condition_layout():
        if name == "expression":
            d = head.expr_basis.norm(dim=1)  # [V,E]
            cols.append(d > threshold * d.amax(0, keepdim=True).clamp_min(1e-12))
        elif name.endswith("_rot6d"):
            w = head.skin_weights[:, head.joint_index(name[: -len("_rot6d")])]
            cols.append((w > threshold)[:, None].expand(V, n))
        else:
            d = head.post_basis[name].norm(dim=1)  # [V,K]
            cols.append(d > threshold * d.amax(0, keepdim=True).clamp_min(1e-12))
    moves = torch.cat(cols, 1) if cols else torch.zeros(V, 0, dtype=torch.bool, device=head.faces.device)  # [V,C]
    tri = head.faces[face_idx]  # [N,3]
    per_gauss = moves[tri].any(1)  # [N,C]
    if only_static:
        per_gauss = per_gauss.any(1, keepdim=True).expand_as(per_gauss)
    masks, group = torch.unique(per_gauss.cpu(), dim=0, return_inverse=True)  # once, at build: on the CPU
    return masks.float().to(face_idx.device), group.to(face_idx.device)


def mean_sq_knn_distance(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean squared distance to the k nearest other points (what 3DGS's distCUDA2 computes)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(points).query(points, k=k + 1)
    return (d[:, 1:] ** 2).mean(1)
