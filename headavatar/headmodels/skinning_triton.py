"""Triton twins of skinning.py's kinematic chain and linear blend skinning, for frames without gradients.

A head model's pose is a handful of joints: in torch, the joints' Rodrigues rotations, the chain and
the rest-joint offsets are some 40 operations on [B, J, 3, 3] tensors, and skinning 7 more on [B, V, ·]
ones.  A replayed frame pays every operation as a CUDA-graph node (≈ 2.3 µs each on an H100 at batch
1, docs/BENCHMARKS.md), far more than their arithmetic.  Here they are two launches:

* ``_chain_kernel`` — one lane per frame: each joint's rotation from its axis-angle (the same
  sinc-form Rodrigues as ``utils.rotations.axis_angle_to_matrix``, exact at zero angle), composed
  with its parent's (parents precede children, so a joint's parent is final before it; read back from
  memory after a block barrier), written as
  ``global_transforms``' rest -> posed 4x4 transforms; also the local rotation matrices and the posed
  joint positions.
* ``_lbs_kernel`` — one lane per vertex: the blended transform of its joints' weights applied to the
  vertex (``skin``).

``skinning.py`` is the reference (tests/test_skinning_triton.py checks both against it, on the CPU
through Triton's interpreter).  No backward: ``HeadModel.forward`` takes this path only when
``pose_kernels == "triton"`` and nothing needs a gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chain_kernel(aa_ptr, jr_ptr, parents_ptr, rots_ptr, g_ptr, joints_ptr, B, J: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = b < B
    for j in tl.static_range(J):
        a3 = aa_ptr + (b * J + j) * 3
        x = tl.load(a3, mask=m, other=0.0)
        y = tl.load(a3 + 1, mask=m, other=0.0)
        z = tl.load(a3 + 2, mask=m, other=0.0)
        # R = (1 - c t^2) I + s K + c v v^T, s = sin(t)/t, c = (1 - cos t)/t^2 = (sin(t/2)/(t/2))^2 / 2
        t2 = x * x + y * y + z * z
        t = tl.sqrt(tl.maximum(t2, 1e-12))
        s = tl.sin(t) / t
        h = tl.sin(0.5 * t) / (0.5 * t)
        c = 0.5 * h * h
        d = 1.0 - c * t2
        r00 = d + c * x * x
        r01 = c * x * y - s * z
        r02 = c * x * z + s * y
        r10 = c * y * x + s * z
        r11 = d + c * y * y
        r12 = c * y * z - s * x
        r20 = c * z * x - s * y
        r21 = c * z * y + s * x
        r22 = d + c * z * z
        rb = rots_ptr + (b * J + j) * 9
        tl.store(rb, r00, mask=m)
        tl.store(rb + 1, r01, mask=m)
        tl.store(rb + 2, r02, mask=m)
        tl.store(rb + 3, r10, mask=m)
        tl.store(rb + 4, r11, mask=m)
        tl.store(rb + 5, r12, mask=m)
        tl.store(rb + 6, r20, mask=m)
        tl.store(rb + 7, r21, mask=m)
        tl.store(rb + 8, r22, mask=m)

        j3 = jr_ptr + (b * J + j) * 3
        jx = tl.load(j3, mask=m, other=0.0)
        jy = tl.load(j3 + 1, mask=m, other=0.0)
        jz = tl.load(j3 + 2, mask=m, other=0.0)
        if j == 0:  # the root: its global transform is its local one, translated to its rest position
            g00, g01, g02, g10, g11, g12, g20, g21, g22 = r00, r01, r02, r10, r11, r12, r20, r21, r22
            tx, ty, tz = jx, jy, jz
        else:
            # the parent's global transform, read back from what this lane wrote (rest offset added back)
            p = tl.load(parents_ptr + j)
            pg = g_ptr + (b * J + p) * 16
            p00 = tl.load(pg, mask=m, other=0.0)
            p01 = tl.load(pg + 1, mask=m, other=0.0)
            p02 = tl.load(pg + 2, mask=m, other=0.0)
            p10 = tl.load(pg + 4, mask=m, other=0.0)
            p11 = tl.load(pg + 5, mask=m, other=0.0)
            p12 = tl.load(pg + 6, mask=m, other=0.0)
            p20 = tl.load(pg + 8, mask=m, other=0.0)
            p21 = tl.load(pg + 9, mask=m, other=0.0)
            p22 = tl.load(pg + 10, mask=m, other=0.0)
            pj = joints_ptr + (b * J + p) * 3  # the parent's posed position: its chain translation
            ptx = tl.load(pj, mask=m, other=0.0)
            pty = tl.load(pj + 1, mask=m, other=0.0)
            ptz = tl.load(pj + 2, mask=m, other=0.0)
            pr = jr_ptr + (b * J + p) * 3
            ux = jx - tl.load(pr, mask=m, other=0.0)
            uy = jy - tl.load(pr + 1, mask=m, other=0.0)
            uz = jz - tl.load(pr + 2, mask=m, other=0.0)
            g00 = p00 * r00 + p01 * r10 + p02 * r20
            g01 = p00 * r01 + p01 * r11 + p02 * r21
            g02 = p00 * r02 + p01 * r12 + p02 * r22
            g10 = p10 * r00 + p11 * r10 + p12 * r20
            g11 = p10 * r01 + p11 * r11 + p12 * r21
            g12 = p10 * r02 + p11 * r12 + p12 * r22
            g20 = p20 * r00 + p21 * r10 + p22 * r20
            g21 = p20 * r01 + p21 * r11 + p22 * r21
            g22 = p20 * r02 + p21 * r12 + p22 * r22
            tx = p00 * ux + p01 * uy + p02 * uz + ptx
            ty = p10 * ux + p11 * uy + p12 * uz + pty
            tz = p20 * ux + p21 * uy + p22 * uz + ptz
        # rest -> posed: G' x = G (x - j_rest)
        gb = g_ptr + (b * J + j) * 16
        tl.store(gb, g00, mask=m)
        tl.store(gb + 1, g01, mask=m)
        tl.store(gb + 2, g02, mask=m)
        tl.store(gb + 3, tx - (g00 * jx + g01 * jy + g02 * jz), mask=m)
        tl.store(gb + 4, g10, mask=m)
        tl.store(gb + 5, g11, mask=m)
        tl.store(gb + 6, g12, mask=m)
        tl.store(gb + 7, ty - (g10 * jx + g11 * jy + g12 * jz), mask=m)
        tl.store(gb + 8, g20, mask=m)
        tl.store(gb + 9, g21, mask=m)
        tl.store(gb + 10, g22, mask=m)
        tl.store(gb + 11, tz - (g20 * jx + g21 * jy + g22 * jz), mask=m)
        tl.store(gb + 12, tl.zeros_like(g00), mask=m)
        tl.store(gb + 13, tl.zeros_like(g00), mask=m)
        tl.store(gb + 14, tl.zeros_like(g00), mask=m)
        tl.store(gb + 15, tl.full(g00.shape, 1.0, g00.dtype), mask=m)
        jb = joints_ptr + (b * J + j) * 3
        tl.store(jb, tx, mask=m)
        tl.store(jb + 1, ty, mask=m)
        tl.store(jb + 2, tz, mask=m)
        # children read this joint back: a block barrier makes the writes visible to every thread, whichever
        # thread the compiler's layout gives a lane (a lane is meant to be one thread, but that is its choice)
        tl.debug_barrier()


@triton.jit
def _lbs_kernel(v_ptr, w_ptr, g_ptr, out_ptr, V, J: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < V
    vb = v_ptr + (b * V + rows) * 3
    x = tl.load(vb, mask=m, other=0.0)
    y = tl.load(vb + 1, mask=m, other=0.0)
    z = tl.load(vb + 2, mask=m, other=0.0)
    ox = tl.zeros([BLOCK], dtype=tl.float32)
    oy = tl.zeros([BLOCK], dtype=tl.float32)
    oz = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(J):
        w = tl.load(w_ptr + rows * J + j, mask=m, other=0.0)
        gb = g_ptr + (b * J + j) * 16  # one joint's transform: the same for every lane (broadcast loads)
        # the blended transform's rows applied to (x, y, z, 1), summed over the joints: sum_j w_j (G_j x)
        ox += w * (tl.load(gb) * x + tl.load(gb + 1) * y + tl.load(gb + 2) * z + tl.load(gb + 3))
        oy += w * (tl.load(gb + 4) * x + tl.load(gb + 5) * y + tl.load(gb + 6) * z + tl.load(gb + 7))
        oz += w * (tl.load(gb + 8) * x + tl.load(gb + 9) * y + tl.load(gb + 10) * z + tl.load(gb + 11))
    ob = out_ptr + (b * V + rows) * 3
    tl.store(ob, ox, mask=m)
    tl.store(ob + 1, oy, mask=m)
    tl.store(ob + 2, oz, mask=m)


def _parents_tensor(parents: list[int], device: torch.device) -> torch.Tensor:
    """The parent list as a device tensor, checked and built once per list and device (read in every frame)."""
    key = (tuple(parents), str(device))
    t = _PARENTS.get(key)
    if t is None:
        if parents[0] != -1 or any(parents[j] >= j for j in range(1, len(parents))):
            raise ValueError("parents must start with the root (-1) and precede their children")
        t = _PARENTS[key] = torch.tensor([max(p, 0) for p in parents], dtype=torch.int32, device=device)
    return t


_PARENTS: dict = {}


def chain_triton(parents: list[int], joint_rotations: torch.Tensor, joints_rest: torch.Tensor):
    """(local rotations [B,J,3,3], rest -> posed transforms [B,J,4,4], posed joints [B,J,3]) of axis-angle
    rotations [B,J,3] and rest joints [B|1,J,3]: ``axis_angle_to_matrix``, ``global_transforms`` and
    ``transform_points(G, joints_rest)`` of skinning.py in one launch (float32)."""
    B, J = joint_rotations.shape[:2]
    dev = joint_rotations.device
    par = _parents_tensor(parents, dev)
    if par.numel() != J:
        raise ValueError(f"{len(parents)} parents for {J} joints")
    aa = joint_rotations.float().contiguous()
    jr = joints_rest.float().expand(B, -1, -1).contiguous()
    rots = torch.empty(B, J, 3, 3, device=dev, dtype=torch.float32)
    G = torch.empty(B, J, 4, 4, device=dev, dtype=torch.float32)
    joints = torch.empty(B, J, 3, device=dev, dtype=torch.float32)
    # one thread per frame (a block of 32 per warp, no replicated lanes): a joint reads its parent's transform
    # back from memory, the same thread's own earlier write (and a barrier after each joint besides)
    block = 32 if B <= 32 else 128
    _chain_kernel[(triton.cdiv(B, block),)](aa, jr, par, rots, G, joints, B, J=J, BLOCK=block,
                                            num_warps=block // 32)
    return rots, G, joints


def skin_triton(v: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``skinning.skin``: rest vertices [B,V,3], weights [V,J], joint transforms [B,J,4,4] -> posed [B,V,3]."""
    B, V = v.shape[:2]
    J = weights.shape[1]
    out = torch.empty(B, V, 3, device=v.device, dtype=torch.float32)
    _lbs_kernel[(triton.cdiv(V, block), B)](v.float().contiguous(), weights.float().contiguous(),
                                            transforms.float().contiguous(), out, V, J=J, BLOCK=block)
    return out
