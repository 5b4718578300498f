"""One interface for every parametric head model (procedural, FLAME, ICT-FaceKit).

A head model is data: a template mesh with UVs, linear identity/expression
bases, a joint hierarchy with linear blend skinning (optionally pose
correctives), named vertex regions and a 68-point landmark embedding.  The
``HeadModel`` class below holds that data and implements the one deformation
every model shares (its pieces in headavatar.headmodels.skinning):

    v = template + shape_basis @ shape + expr_basis @ expression
        + pose_basis @ pose_features(rotations)          (if the model has one)
    v = LBS(v, joints(v_shaped), rotations, skin_weights) + translation
        + post_basis @ extras                             (e.g. FLAME eyelids)

Joint 0 is the root (global head rotation).  ``joint_rotations`` are
axis-angle vectors, one per joint, relative to the parent.

The per-frame *condition vector* (what FlashAvatar's MLP is conditioned on) is
``expression ⊕ 6D rotation of each condition joint ⊕ extras`` -- for FLAME
that is exp(100) ⊕ jaw(6) ⊕ eyes(12) ⊕ eyelids(2) = 120, as the reference.
``condition_layout()`` names the pieces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from headavatar.headmodels.params import FrameParams
from headavatar.headmodels.skinning import blend_shapes, global_transforms, pose_correctives, skin, transform_points
from headavatar.utils.rotations import axis_angle_to_matrix, matrix_to_6d

# Region names every head model provides (vertex index arrays).  "boundary" is
# the rim to exclude (e.g. the bottom of the neck) when sampling Gaussians.
REQUIRED_REGIONS = ("face", "mouth_interior", "lips", "eyes", "hair", "neck", "boundary")


@dataclass
class HeadModel:
    name: str
    template: torch.Tensor  # [V,3] float32, metres
    faces: torch.Tensor  # [F,3] int64
    uvs: torch.Tensor  # [T,2] float32 in [0,1], v=0 at the bottom of the texture (OBJ convention)
    uv_faces: torch.Tensor  # [F,3] int64 into uvs
    shape_basis: torch.Tensor  # [V,3,S]
    expr_basis: torch.Tensor  # [V,3,E]
    expression_names: list[str]
    joint_names: list[str]
    parents: list[int]  # parents[0] == -1
    joint_regressor: torch.Tensor  # [J,V] (rows sum to 1)
    skin_weights: torch.Tensor  # [V,J] (rows sum to 1)
    regions: dict[str, np.ndarray]  # name -> vertex indices (int64)
    landmark_faces: torch.Tensor  # [68] int64 face index
    landmark_bary: torch.Tensor  # [68,3] barycentric weights
    condition_joints: list[str] = field(default_factory=list)  # joints whose rotations condition the avatar
    pose_basis: torch.Tensor | None = None  # [9*(J-1), V*3] FLAME-style correctives on (R_j - I), j >= 1
    post_basis: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [V,3,K] added after skinning
    face_labels: torch.Tensor | None = None  # [F] int64 parsing label per face (see subjects.format.LABELS)
    meta: dict = field(default_factory=dict)
    # how forward poses frames that need no gradient: "torch" (skinning.py) or "triton" (skinning_triton.py,
    # two launches instead of ~45 operations; set by FlashAvatarAvatar's fuse_frame="triton").  Not a field:
    # a run-time choice, never saved with the model
    pose_kernels = "torch"

    # ------------------------------------------------------------------ sizes
    @property
    def num_vertices(self) -> int:
        return self.template.shape[0]

    @property
    def num_shape(self) -> int:
        return self.shape_basis.shape[-1]

    @property
    def num_expression(self) -> int:
        return self.expr_basis.shape[-1]

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def extras_sizes(self) -> dict[str, int]:
        return {k: v.shape[-1] for k, v in self.post_basis.items()}

    def condition_layout(self) -> list[tuple[str, int]]:
        """Names and sizes of the pieces of the condition vector, in order."""
        layout = [("expression", self.num_expression)]
        layout += [(f"{j}_rot6d", 6) for j in self.condition_joints]
        layout += list(self.extras_sizes().items())
        return layout

    @property
    def condition_dim(self) -> int:
        return sum(n for _, n in self.condition_layout())

    def fingerprint(self) -> str:
        """Short hash of the topology and template: subjects record it to catch a mismatched model."""
        h = hashlib.sha1()
        h.update(self.name.encode())
        h.update(np.ascontiguousarray(self.faces.cpu().numpy().astype(np.int64)).tobytes())
        h.update(np.round(self.template.cpu().numpy().astype(np.float64), 5).tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------- operations
    def to(self, device) -> "HeadModel":
        def mv(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        out = HeadModel(**{k: mv(getattr(self, k)) for k in self.__dataclass_fields__})
        out.post_basis = {k: v.to(device) for k, v in self.post_basis.items()}
        return out

    def joint_index(self, name: str) -> int:
        return self.joint_names.index(name)

    def condition(self, expression: torch.Tensor, joint_rotations: torch.Tensor, extras: dict[str, torch.Tensor] | None = None,
                  rotations: torch.Tensor | None = None) -> torch.Tensor:
        """[B,E], [B,J,3] (axis-angle), extras -> [B, condition_dim].  ``rotations``: the same joints'
        matrices [B,J,3,3] where the caller has them (``forward(..., return_rotations=True)``), which
        saves converting them again."""
        parts = [expression]
        if self.condition_joints:  # one conversion for all of them: a few kernels per frame, not a few per joint
            idx = [self.joint_index(j) for j in self.condition_joints]
            if rotations is None:
                m = axis_angle_to_matrix(torch.stack([joint_rotations[:, i] for i in idx], 1))  # [B,n,3,3]
            else:
                m = torch.stack([rotations[:, i] for i in idx], 1)
            parts.append(matrix_to_6d(m).reshape(m.shape[0], -1))
        extras = extras or {}
        for k, n in self.extras_sizes().items():
            parts.append(extras[k] if k in extras else expression.new_zeros(expression.shape[0], n))
        return torch.cat(parts, -1)

    def shaped(self, shape: torch.Tensor | None = None, expression: torch.Tensor | None = None) -> torch.Tensor:
        """Unposed vertices [B,V,3] for the given identity and expression."""
        B = 1
        for x in (shape, expression):
            if x is not None:
                B = x.shape[0]
        v = self.template[None].expand(B, -1, -1)
        if shape is not None and self.num_shape:
            v = v + blend_shapes(self.shape_basis[..., : shape.shape[-1]], shape)
        if expression is not None and self.num_expression:
            v = v + blend_shapes(self.expr_basis[..., : expression.shape[-1]], expression)
        return v

    def forward(
        self,
        shape: torch.Tensor | FrameParams | None = None,
        expression: torch.Tensor | None = None,
        joint_rotations: torch.Tensor | None = None,
        translation: torch.Tensor | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        return_joints: bool = False,
        return_rotations: bool = False,
    ):
        """Posed vertices [B,V,3], then, if asked, posed joint positions [B,J,3] and the joints' local
        rotation matrices [B,J,3,3] (computed here anyway; callers save the conversion from axis-angle).

        Takes a ``FrameParams`` (``head(params)``), or its parts (a part left out: the mean identity,
        zero expression, the rest pose, no translation).  A dict with the FrameParams keys is accepted
        in its place too, for one release (the older calling convention)."""
        if isinstance(shape, (FrameParams, dict)):
            p = FrameParams.of(shape)
            shape, expression, joint_rotations, translation, extras = p.shape, p.expression, p.joint_rotations, p.translation, p.extras or None
        v_shaped = self.shaped(shape, expression)
        if extras and "gaze" in extras:  # eyeballs turn about their centres (headmodels/gaze.py); models without them ignore it
            from headavatar.headmodels.gaze import rotate_eyes

            v_shaped = rotate_eyes(self, v_shaped, extras["gaze"])
        B = v_shaped.shape[0]
        J = self.num_joints
        if joint_rotations is None:
            joint_rotations = v_shaped.new_zeros(B, J, 3)
        # joints are regressed from the shaped mesh, expression included, as FLAME does
        joints_rest = torch.einsum("jv,bvc->bjc", self.joint_regressor, v_shaped)
        # the chain and the skinning as two Triton launches (skinning_triton.py) where asked and nothing
        # needs a gradient; else skinning.py's torch operations (the reference)
        fast = self.pose_kernels == "triton" and not (torch.is_grad_enabled() and (
            v_shaped.requires_grad or joint_rotations.requires_grad or self.skin_weights.requires_grad))
        if fast:
            from headavatar.headmodels.skinning_triton import chain_triton, skin_triton

            rots, G, joints = chain_triton(self.parents, joint_rotations, joints_rest)
        else:
            rots = axis_angle_to_matrix(joint_rotations)  # [B,J,3,3]
            G = self.global_transforms(rots, joints_rest)  # [B,J,4,4]
        v_posed = v_shaped
        if self.pose_basis is not None and J > 1:
            v_posed = v_posed + pose_correctives(rots, self.pose_basis)
        v = skin_triton(v_posed, self.skin_weights, G) if fast else skin(v_posed, self.skin_weights, G)
        if extras:
            for k, basis in self.post_basis.items():
                if k in extras:
                    v = v + blend_shapes(basis, extras[k])
        if return_joints and not fast:
            joints = transform_points(G, joints_rest)
        if translation is not None:
            v = v + translation[:, None]
            if return_joints:
                joints = joints + translation[:, None]
        out = (v,) + ((joints,) if return_joints else ()) + ((rots,) if return_rotations else ())
        return out if len(out) > 1 else v

    __call__ = forward

    def global_transforms(self, rots: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Rest -> posed transforms [B,J,4,4] of the joints for local rotations [B,J,3,3] and rest joints [B|1,J,3]."""
        return global_transforms(self.parents, rots, joints)

    def jaw_open_sign(self) -> float:
        """+1 if a positive x rotation of the 'jaw' joint moves the jaw down (FLAME's convention), -1 if up, 0 without a jaw."""
        if "jaw" not in self.joint_names:
            return 0.0
        j = self.joint_index("jaw")
        rot = torch.zeros(1, self.num_joints, 3)
        rot[0, j, 0] = 0.2
        with torch.no_grad():
            v0 = self(joint_rotations=torch.zeros_like(rot).to(self.template))
            v1 = self(joint_rotations=rot.to(self.template))
        w = self.skin_weights[:, j]
        dy = ((v1 - v0)[0, :, 1] * w).sum() / w.sum().clamp_min(1e-8)
        return 1.0 if float(dy) <= 0 else -1.0

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """[B,V,3] -> [B,68,3] via the barycentric landmark embedding."""
        tri = self.faces[self.landmark_faces]  # [68,3]
        return (vertices[:, tri] * self.landmark_bary[None, :, :, None]).sum(-2)

    def region_face_mask(self, region: str, mode: str = "all") -> torch.Tensor:
        """[F] bool: faces whose vertices are all ("all") / any ("any") in the region."""
        inside = torch.zeros(self.num_vertices, dtype=torch.bool, device=self.faces.device)
        inside[torch.as_tensor(self.regions[region], device=self.faces.device)] = True
        hit = inside[self.faces]
        return hit.all(-1) if mode == "all" else hit.any(-1)

    def validate(self) -> None:
        """Cheap consistency checks; raise ValueError with a precise message."""
        V = self.num_vertices
        J = self.num_joints
        checks = [
            (self.template.shape == (V, 3), "template must be [V,3]"),
            (self.faces.dim() == 2 and self.faces.shape[1] == 3, "faces must be [F,3]"),
            (int(self.faces.max()) < V, "faces index past the vertices"),
            (self.uv_faces.shape == self.faces.shape, "uv_faces must match faces"),
            (self.shape_basis.shape[:2] == (V, 3), "shape_basis must be [V,3,S]"),
            (self.expr_basis.shape[:2] == (V, 3), "expr_basis must be [V,3,E]"),
            (len(self.expression_names) == self.num_expression, "one name per expression"),
            (len(self.parents) == J and self.parents[0] == -1, "parents must start with the root (-1)"),
            (all(self.parents[j] < j for j in range(1, J)), "parents must precede children"),
            (self.joint_regressor.shape == (J, V), "joint_regressor must be [J,V]"),
            (self.skin_weights.shape == (V, J), "skin_weights must be [V,J]"),
            (self.landmark_faces.shape == (68,) and self.landmark_bary.shape == (68, 3), "68 landmarks"),
            (all(r in self.regions for r in REQUIRED_REGIONS), f"regions must include {REQUIRED_REGIONS}"),
            (all(j in self.joint_names for j in self.condition_joints), "condition joints must be joints"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"head model '{self.name}': {msg}")
