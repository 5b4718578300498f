"""The tracking overlay: a video a person watches to judge the tracking by eye.

Each frame shows the detected landmarks (green), the fitted head model's
landmarks (red) joined to them by a thin line (the residual), and a sparse
cloud of the fitted mesh's face vertices (faint blue), so a drifting pose or
a wrong expression stands out.  Frames marked invalid get a red border and
the word "lost".  Also: projected landmarks of a fit, and the reprojection
error figures the benchmarks report.
"""

from __future__ import annotations

import numpy as np
import torch

GREEN = (40, 220, 60)
RED = (235, 50, 50)
BLUE = (90, 160, 255)


def vertex_embedding(model, vertices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A landmark embedding (faces [P], barycentric [P,3]) that lands exactly on the given vertices."""
    faces = model.faces.cpu().numpy()
    flat = faces.reshape(-1)
    first = np.full(model.num_vertices, -1, np.int64)
    order = np.arange(len(flat))[::-1]
    first[flat[order]] = order  # the first face corner that holds each vertex
    corner = first[np.asarray(vertices, np.int64)]
    ok = corner >= 0
    if not ok.all():
        raise ValueError("some vertices belong to no face")
    bary = np.zeros((len(corner), 3), np.float32)
    bary[np.arange(len(corner)), corner % 3] = 1.0
    return torch.as_tensor(corner // 3), torch.as_tensor(bary)


@torch.no_grad()
def project_fit(model, tracking, image_size: tuple[int, int], idx=None, batch: int = 256, mesh_points: np.ndarray | None = None):
    """Fitted landmarks [N,68,2] (and projected ``mesh_points`` vertices [N,P,2]) in pixels.

    Only the landmark and drawn vertices are evaluated (the fitter's
    LandmarkModel), not the whole mesh: ~50x cheaper for ICT.
    """
    from headavatar.tracking.fit import LandmarkModel

    H, W = image_size
    n = tracking.num_frames
    idx = np.arange(n) if idx is None else np.asarray(idx)
    faces, bary = model.landmark_faces.cpu(), model.landmark_bary.cpu()
    L = len(faces)
    if mesh_points is not None and len(mesh_points):
        mf, mb = vertex_embedding(model, mesh_points)
        faces, bary = torch.cat([faces, mf]), torch.cat([bary, mb.to(bary)])
    points = LandmarkModel(model, (faces, bary))
    out = []
    for s in range(0, len(idx), batch):
        b = idx[s : s + batch]
        p = tracking.params(b)
        X = points(p.shape, p.expression, p.joint_rotations, p.translation, extras=p.extras or None)
        out.append(tracking.cameras(b, H, W).project(X).numpy())
    uv = np.concatenate(out) if out else np.zeros((0, len(faces), 2), np.float32)
    return uv[:, :L], (uv[:, L:] if mesh_points is not None else None)


def mesh_point_subset(model, max_points: int = 1500, seed: int = 0) -> np.ndarray:
    """A fixed, evenly spread subset of the model's face vertices to draw."""
    face = np.asarray(model.regions.get("face", np.arange(model.num_vertices)), np.int64)
    if len(face) <= max_points:
        return face
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(face, max_points, replace=False))


def reprojection_errors(detected: np.ndarray, fitted: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[Nv*68] pixel distances between detected and fitted landmarks on valid frames."""
    v = np.asarray(valid, bool)
    d = np.linalg.norm(np.asarray(detected, np.float64)[v] - np.asarray(fitted, np.float64)[v], axis=-1)
    return d.reshape(-1)


# Parsing label colours of the overlay's inset (subjects.format.LABELS order).
LABEL_COLOURS = np.array([[0, 0, 0], [255, 200, 150], [120, 60, 0], [0, 0, 255], [255, 0, 0], [120, 0, 120], [255, 255, 0],
                          [0, 255, 0], [0, 150, 255], [255, 0, 255]], np.uint8)


def parsing_inset(image: np.ndarray, parsing: np.ndarray, scale: int = 3) -> np.ndarray:
    """The frame at 1/``scale`` size with its parsing labels blended in (for checking the labels by eye)."""
    import cv2

    H, W = parsing.shape
    small = cv2.resize(image, (W // scale, H // scale), interpolation=cv2.INTER_AREA)
    lab = cv2.resize(parsing, (W // scale, H // scale), interpolation=cv2.INTER_NEAREST)
    return (0.45 * small + 0.55 * LABEL_COLOURS[np.minimum(lab, len(LABEL_COLOURS) - 1)]).astype(np.uint8)


def draw_overlay(image: np.ndarray, detected: np.ndarray | None, fitted: np.ndarray | None, mesh2d: np.ndarray | None = None, valid: bool = True,
                 parsing: np.ndarray | None = None) -> np.ndarray:
    """Draw on a copy of ``image`` (HxWx3 uint8 RGB); ``parsing``: labels shown as an inset, top left."""
    import cv2

    out = image.copy()
    H, W = out.shape[:2]
    inset = parsing_inset(image, parsing) if parsing is not None else None
    if mesh2d is not None and valid:
        p = np.round(mesh2d - 0.5).astype(np.int64)  # pixel centre convention -> array index
        ok = (p[:, 0] >= 0) & (p[:, 0] < W) & (p[:, 1] >= 0) & (p[:, 1] < H)
        p = p[ok]
        out[p[:, 1], p[:, 0]] = (0.45 * out[p[:, 1], p[:, 0]] + 0.55 * np.array(BLUE)).astype(np.uint8)
    sh = 4  # sub-pixel drawing: coordinates carry 4 fractional bits

    def q(x):
        return np.round((np.asarray(x) - 0.5) * (1 << sh)).astype(np.int32)

    if detected is not None and fitted is not None and valid:
        for a, b in zip(q(detected), q(fitted)):
            cv2.line(out, tuple(int(v) for v in a), tuple(int(v) for v in b), (255, 255, 255), 1, cv2.LINE_AA, sh)
    r = max(1, round(W / 256)) << sh
    if detected is not None:
        for a in q(detected):
            cv2.circle(out, tuple(int(v) for v in a), r, GREEN, -1, cv2.LINE_AA, sh)
    if fitted is not None and valid:
        for a in q(fitted):
            cv2.circle(out, tuple(int(v) for v in a), r, RED, -1, cv2.LINE_AA, sh)
    if inset is not None:
        out[: inset.shape[0], : inset.shape[1]] = inset
        cv2.rectangle(out, (0, 0), (inset.shape[1], inset.shape[0]), (255, 255, 255), 1)
    if not valid:
        cv2.rectangle(out, (0, 0), (W - 1, H - 1), RED, max(2, W // 128))
        cv2.putText(out, "lost", (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, RED, 2, cv2.LINE_AA)
    return out
