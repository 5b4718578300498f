"""The deformation MLP of a rendering frame, and the Gaussians' assembly after it, as one Triton kernel.

``DeformMLP`` in torch is a chain of matmuls, each writing its [B, N, W] activations to memory and
the next reading them back (at batch 64 with the paper's 19k Gaussians, about 1.3 GB per layer in
bf16), plus a graph node per operation.  Here one program takes ``block_m`` Gaussians of one frame
through every layer with the activations in registers: the first layer (position-encoding part plus
the frame's condition part, gathered per Gaussian's condition mask), the hidden layers with bias and
ReLU, and the output layer with tanh.  Only the weights are read per program (from L2).

The activations are held as four column quarters ``h0..h3`` of [block_m, W/4]: every layer is
sixteen [block_m, W/4] x [W/4, W/4] products (8 KB weight operands in bf16 at W = 256), and nothing
needs concatenating registers (two halves used more registers and spilled).  The layer loop is a real loop (not
unrolled): unrolled, the compiler hoists every layer's weight loads and spills.  Compiled offline for
sm_90 (benchmarks/triton_offline_compile.py): bf16, block_m 64, 8 warps: 186 registers, no spill, 44 KB
shared memory.  fp32 weights do not fit shared memory at width 256 on a GPU (the model keeps the torch
MLP there); the interpreter runs them for the exact comparison.

``_gaussians_kernel`` adds the assembly of ``FlashAvatarModel.gaussians`` as an epilogue (the point on
the posed mesh, the shell Gaussians' normal offset, the rotation product, the scale exponent) and writes
means, quaternions and scales; ``_mlp_kernel`` writes the MLP's output alone.  Rendering only (no
backward): ``FlashAvatarModel.gaussians`` uses it where nothing needs a gradient and ``mlp_kernel ==
"triton"`` (issue 15 item 3).  The torch MLP is the reference: fp32 weights give its values to
float rounding (``input_precision="ieee"``), bf16 ones its bf16-autocast values to bf16 rounding
(tests/test_mlp_triton.py; on the CPU through Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

OUT_PAD = 16  # the output layer's 10 columns padded to tl.dot's smallest N


@dataclass
class PackedMLP:
    """A DeformMLP's weights laid out for the kernel (transposed: in x out; padded; one dtype)."""

    pe_w: torch.Tensor  # [P_PAD, W]
    pe_b: torch.Tensor  # [W] fp32
    cond_w: torch.Tensor  # [C, W] fp32 (the per-frame part stays in torch: [B, U, C] x [C, W])
    hid_w: torch.Tensor  # [L, W, W]
    hid_b: torch.Tensor  # [L, W] fp32
    out_w: torch.Tensor  # [W, OUT_PAD]
    out_b: torch.Tensor  # [OUT_PAD] fp32
    width: int
    pe_dim: int
    n_out: int
    versions: tuple  # the parameters' (data_ptr, _version) when packed: stale when they change


def supported(mlp) -> tuple[bool, str]:
    """(usable, why not) for this MLP's shape."""
    w = mlp.pe_in.out_features
    if w < 64 or w & (w - 1):
        return False, f"the fused MLP needs a power-of-two width of at least 64, got {w}"
    if len(mlp.hidden) < 1:
        return False, "the fused MLP needs at least one hidden layer"
    if mlp.out.out_features > OUT_PAD:
        return False, f"the fused MLP has at most {OUT_PAD} outputs, got {mlp.out.out_features}"
    return True, ""


def _versions(mlp) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in mlp.parameters())


def pack(mlp, dtype: torch.dtype) -> PackedMLP:
    """Transpose, pad and cast ``mlp``'s weights once (rendering reuses them every frame)."""
    ok, why = supported(mlp)
    if not ok:
        raise ValueError(why)
    with torch.no_grad():
        W, P = mlp.pe_in.out_features, mlp.pe_in.in_features
        p_pad = max(16, triton.next_power_of_2(P))
        dev = mlp.pe_in.weight.device
        pe_w = torch.zeros(p_pad, W, device=dev, dtype=dtype)
        pe_w[:P] = mlp.pe_in.weight.t().to(dtype)
        hid_w = torch.stack([lin.weight.t() for lin in mlp.hidden]).to(dtype).contiguous()
        hid_b = torch.stack([lin.bias for lin in mlp.hidden]).float().contiguous()
        n_out = mlp.out.out_features
        out_w = torch.zeros(W, OUT_PAD, device=dev, dtype=dtype)
        out_w[:, :n_out] = mlp.out.weight.t().to(dtype)
        out_b = torch.zeros(OUT_PAD, device=dev, dtype=torch.float32)
        out_b[:n_out] = mlp.out.bias.float()
        return PackedMLP(pe_w.contiguous(), mlp.pe_in.bias.float().contiguous(), mlp.cond_in.weight.t().float().contiguous(),
                         hid_w, hid_b, out_w.contiguous(), out_b, W, P, n_out, _versions(mlp))


def packed_for(mlp, dtype: torch.dtype) -> PackedMLP:
    """``pack(mlp, dtype)``, cached on the module until a parameter changes (loading a checkpoint, an
    optimiser step) or the dtype does."""
    cache = getattr(mlp, "_triton_packed", None)
    if cache is None or cache.pe_w.dtype != dtype or cache.versions != _versions(mlp):
        cache = pack(mlp, dtype)
        mlp._triton_packed = cache
    return cache


@triton.jit
def _wblock(w_ptr, row0, col0, ld, Q: tl.constexpr):
    r = tl.arange(0, Q)
    return tl.load(w_ptr + (row0 + r)[:, None] * ld + col0 + tl.arange(0, Q)[None, :])


@triton.jit
def _layer_part(h0, h1, h2, h3, w_ptr, b_ptr, col0, ld, Q: tl.constexpr, PREC: tl.constexpr):
    """relu(h @ w[:, col0:col0+Q] + b[col0:col0+Q]) in the activations' dtype, h given as four column parts."""
    acc = tl.dot(h0, _wblock(w_ptr, 0, col0, ld, Q), input_precision=PREC)
    acc = tl.dot(h1, _wblock(w_ptr, Q, col0, ld, Q), acc, input_precision=PREC)
    acc = tl.dot(h2, _wblock(w_ptr, 2 * Q, col0, ld, Q), acc, input_precision=PREC)
    acc = tl.dot(h3, _wblock(w_ptr, 3 * Q, col0, ld, Q), acc, input_precision=PREC)
    acc += tl.load(b_ptr + col0 + tl.arange(0, Q))[None, :]
    return tl.maximum(acc, 0.0).to(h0.dtype)


@triton.jit
def _first_part(pe, pe_w_ptr, pe_b_ptr, c_ptr, crow, rmask, col0, W: tl.constexpr, P_PAD: tl.constexpr,
                Q: tl.constexpr, PREC: tl.constexpr):
    c = col0 + tl.arange(0, Q)
    w = tl.load(pe_w_ptr + tl.arange(0, P_PAD)[:, None] * W + c[None, :])
    acc = tl.load(c_ptr + crow[:, None] + c[None, :], mask=rmask[:, None], other=0.0)
    acc = tl.dot(pe, w, acc, input_precision=PREC) + tl.load(pe_b_ptr + c)[None, :]
    return tl.maximum(acc, 0.0).to(pe.dtype)


@triton.jit
def _mlp_rows(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr, rows, rmask, b,
              P, U, W: tl.constexpr, P_PAD: tl.constexpr, L: tl.constexpr, OUT_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, HAS_GROUP: tl.constexpr, PREC: tl.constexpr):
    """The MLP's output [BLOCK_M, OUT_PAD] (fp32, after tanh) for Gaussians ``rows`` of frame ``b``."""
    Q: tl.constexpr = W // 4
    dt = pe_w_ptr.dtype.element_ty

    # first layer: pe @ pe_w (per Gaussian) + the frame's condition row of the Gaussian's mask
    pcol = tl.arange(0, P_PAD)
    pe = tl.load(pe_ptr + rows[:, None] * P + pcol[None, :], mask=rmask[:, None] & (pcol[None, :] < P), other=0.0).to(dt)
    if HAS_GROUP:
        g = tl.load(group_ptr + rows, mask=rmask, other=0)
    else:
        g = tl.zeros([BLOCK_M], dtype=tl.int32)
    crow = (b * U + g) * W
    h0 = _first_part(pe, pe_w_ptr, pe_b_ptr, c_ptr, crow, rmask, 0, W, P_PAD, Q, PREC)
    h1 = _first_part(pe, pe_w_ptr, pe_b_ptr, c_ptr, crow, rmask, Q, W, P_PAD, Q, PREC)
    h2 = _first_part(pe, pe_w_ptr, pe_b_ptr, c_ptr, crow, rmask, 2 * Q, W, P_PAD, Q, PREC)
    h3 = _first_part(pe, pe_w_ptr, pe_b_ptr, c_ptr, crow, rmask, 3 * Q, W, P_PAD, Q, PREC)

    # hidden layers: relu(h @ w + bias), each quarter of the output from the four quarters of h
    for layer in range(L):
        wl = hid_w_ptr + layer * W * W
        bl = hid_b_ptr + layer * W
        n0 = _layer_part(h0, h1, h2, h3, wl, bl, 0, W, Q, PREC)
        n1 = _layer_part(h0, h1, h2, h3, wl, bl, Q, W, Q, PREC)
        n2 = _layer_part(h0, h1, h2, h3, wl, bl, 2 * Q, W, Q, PREC)
        n3 = _layer_part(h0, h1, h2, h3, wl, bl, 3 * Q, W, Q, PREC)
        h0, h1, h2, h3 = n0, n1, n2, n3

    # output layer and tanh (as 2 sigmoid(2x) - 1: exact to float rounding, and in every Triton)
    oc = tl.arange(0, OUT_PAD)
    q = tl.arange(0, Q)
    o = tl.dot(h0, tl.load(out_w_ptr + q[:, None] * OUT_PAD + oc[None, :]), input_precision=PREC)
    o = tl.dot(h1, tl.load(out_w_ptr + (Q + q)[:, None] * OUT_PAD + oc[None, :]), o, input_precision=PREC)
    o = tl.dot(h2, tl.load(out_w_ptr + (2 * Q + q)[:, None] * OUT_PAD + oc[None, :]), o, input_precision=PREC)
    o = tl.dot(h3, tl.load(out_w_ptr + (3 * Q + q)[:, None] * OUT_PAD + oc[None, :]), o, input_precision=PREC)
    o = o + tl.load(out_b_ptr + oc)[None, :]
    return 2.0 * tl.sigmoid(2.0 * o) - 1.0


@triton.jit
def _mlp_kernel(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr, out_ptr,
                N, P, U,
                W: tl.constexpr, P_PAD: tl.constexpr, L: tl.constexpr, N_OUT: tl.constexpr, OUT_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, HAS_GROUP: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    o = _mlp_rows(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr, rows, rmask, b,
                  P, U, W, P_PAD, L, OUT_PAD, BLOCK_M, HAS_GROUP, PREC)
    oc = tl.arange(0, OUT_PAD)
    tl.store(out_ptr + (b * N + rows)[:, None] * N_OUT + oc[None, :], o, mask=rmask[:, None] & (oc[None, :] < N_OUT))


@triton.jit
def _col(o, oc, k: tl.constexpr):
    """Column ``k`` of a [BLOCK_M, OUT_PAD] register tile as a [BLOCK_M] vector."""
    return tl.sum(tl.where(oc[None, :] == k, o, 0.0), axis=1)


@triton.jit
def _vertex(verts_ptr, fv_ptr, rows, rmask, b, V, k: tl.constexpr):
    """(x, y, z) of corner ``k`` of each Gaussian's triangle in frame ``b`` (``fv``: [N, 3] vertex ids)."""
    vi = tl.load(fv_ptr + rows * 3 + k, mask=rmask, other=0)
    base = verts_ptr + (b * V + vi) * 3
    return (tl.load(base, mask=rmask, other=0.0), tl.load(base + 1, mask=rmask, other=0.0),
            tl.load(base + 2, mask=rmask, other=0.0))


@triton.jit
def _gaussians_kernel(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr,
                      verts_ptr, fv_ptr, bary_ptr, noff_ptr, nsign_ptr, rot_ptr, lscale_ptr,
                      means_ptr, quats_ptr, scales_ptr, N, P, U, V, offset_scale,
                      W: tl.constexpr, P_PAD: tl.constexpr, L: tl.constexpr, OUT_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, HAS_GROUP: tl.constexpr, SHELL: tl.constexpr, PREC: tl.constexpr):
    """The MLP and the Gaussians' assembly (FlashAvatarModel.gaussians: means on the posed mesh plus the
    offset, rotation times the MLP's quaternion, scale exponent) in one program per 64 Gaussians."""
    b = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    o = _mlp_rows(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr, rows, rmask, b,
                  P, U, W, P_PAD, L, OUT_PAD, BLOCK_M, HAS_GROUP, PREC)
    oc = tl.arange(0, OUT_PAD)

    # the point on the posed mesh (barycentric), off the surface along the outward normal for shell Gaussians
    x0, y0, z0 = _vertex(verts_ptr, fv_ptr, rows, rmask, b, V, 0)
    x1, y1, z1 = _vertex(verts_ptr, fv_ptr, rows, rmask, b, V, 1)
    x2, y2, z2 = _vertex(verts_ptr, fv_ptr, rows, rmask, b, V, 2)
    w0 = tl.load(bary_ptr + rows * 3, mask=rmask, other=0.0)
    w1 = tl.load(bary_ptr + rows * 3 + 1, mask=rmask, other=0.0)
    w2 = tl.load(bary_ptr + rows * 3 + 2, mask=rmask, other=0.0)
    mx = x0 * w0 + x1 * w1 + x2 * w2
    my = y0 * w0 + y1 * w1 + y2 * w2
    mz = z0 * w0 + z1 * w1 + z2 * w2
    if SHELL:
        ax, ay, az = x1 - x0, y1 - y0, z1 - z0
        bx, by, bz = x2 - x0, y2 - y0, z2 - z0
        nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        s = (tl.load(noff_ptr + rows, mask=rmask, other=0.0) * tl.load(nsign_ptr + rows, mask=rmask, other=0.0)
             / tl.maximum(tl.sqrt(nx * nx + ny * ny + nz * nz), 1e-12))
        mx += s * nx
        my += s * ny
        mz += s * nz
    mb = means_ptr + (b * N + rows) * 3
    tl.store(mb, mx + offset_scale * _col(o, oc, 0), mask=rmask)
    tl.store(mb + 1, my + offset_scale * _col(o, oc, 1), mask=rmask)
    tl.store(mb + 2, mz + offset_scale * _col(o, oc, 2), mask=rmask)

    # rotation: the Gaussian's own quaternion times (exp(o3), o4, o5, o6), Hamilton product (w, x, y, z)
    bw = tl.exp(_col(o, oc, 3))
    bx, by, bz = _col(o, oc, 4), _col(o, oc, 5), _col(o, oc, 6)
    aw = tl.load(rot_ptr + rows * 4, mask=rmask, other=1.0)
    ax = tl.load(rot_ptr + rows * 4 + 1, mask=rmask, other=0.0)
    ay = tl.load(rot_ptr + rows * 4 + 2, mask=rmask, other=0.0)
    az = tl.load(rot_ptr + rows * 4 + 3, mask=rmask, other=0.0)
    qb = quats_ptr + (b * N + rows) * 4
    tl.store(qb, aw * bw - (ax * bx + ay * by + az * bz), mask=rmask)
    tl.store(qb + 1, aw * bx + bw * ax + (ay * bz - az * by), mask=rmask)
    tl.store(qb + 2, aw * by + bw * ay + (az * bx - ax * bz), mask=rmask)
    tl.store(qb + 3, aw * bz + bw * az + (ax * by - ay * bx), mask=rmask)

    # scale: s_base^c with the exponent c = exp(o) in [1/e, e]
    sb = scales_ptr + (b * N + rows) * 3
    for k in tl.static_range(3):
        ls = tl.load(lscale_ptr + rows * 3 + k, mask=rmask, other=0.0)
        tl.store(sb + k, tl.exp(tl.exp(_col(o, oc, 7 + k)) * ls), mask=rmask)


def _frame_part(pk: PackedMLP, cond: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """The per-frame part of the first layer, [B, U, W] fp32: tiny, in torch; gathered per Gaussian in the kernel."""
    if masks is None:
        return (cond.float() @ pk.cond_w)[:, None].contiguous()
    return ((cond.float()[:, None, :] * masks[None].float()) @ pk.cond_w).contiguous()


def _check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    if device.type == "cuda" and dtype == torch.float32:
        raise ValueError("the fused MLP runs in bf16 or fp16 on CUDA (fp32 weight tiles do not fit shared memory)")


def _mlp_args(pk: PackedMLP, pe: torch.Tensor, c: torch.Tensor, group: torch.Tensor | None) -> tuple:
    return (pe.contiguous(), pk.pe_w, pk.pe_b, c, group if group is not None else c, pk.hid_w, pk.hid_b, pk.out_w, pk.out_b)


def _mlp_consts(pk: PackedMLP, group: torch.Tensor | None, dtype: torch.dtype, block_m: int, num_warps: int) -> dict:
    """The compile-time arguments both kernels share (and the launch's warps)."""
    return dict(W=pk.width, P_PAD=pk.pe_w.shape[0], L=pk.hid_w.shape[0], OUT_PAD=OUT_PAD, BLOCK_M=block_m,
                HAS_GROUP=group is not None, PREC="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps)


def deform_mlp_triton(mlp, pe: torch.Tensor, cond: torch.Tensor, masks: torch.Tensor | None = None,
                      group: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                      block_m: int = 64, num_warps: int = 8) -> torch.Tensor:
    """``mlp(pe, cond, masks, group)`` for rendering, [B, N, n_out] fp32; ``dtype``: the matmuls' input
    type (bf16: the torch MLP's autocast path; fp32: exact products, interpreter only)."""
    _check_dtype(pe.device, dtype)
    pk = packed_for(mlp, dtype)
    N, B = pe.shape[0], cond.shape[0]
    c = _frame_part(pk, cond, masks)
    out = torch.empty(B, N, pk.n_out, device=pe.device, dtype=torch.float32)
    _mlp_kernel[(triton.cdiv(N, block_m), B)](
        *_mlp_args(pk, pe, c, group), out, N, pk.pe_dim, c.shape[1], N_OUT=pk.n_out,
        **_mlp_consts(pk, group, dtype, block_m, num_warps))
    return out


def gaussians_triton(model, cond: torch.Tensor, verts: torch.Tensor, dtype: torch.dtype,
                     block_m: int = 64, num_warps: int = 8) -> dict[str, torch.Tensor]:
    """``FlashAvatarModel.gaussians(cond, verts)``'s means, quats and scales [B, N, ...] fp32 from one kernel
    (the MLP and the assembly); the caller adds the colours and opacities, which do not change per frame."""
    mlp = model.mlp
    if mlp.out.out_features != 10:
        raise ValueError(f"the Gaussian assembly needs the MLP's 10 outputs, got {mlp.out.out_features}")
    _check_dtype(verts.device, dtype)
    pk = packed_for(mlp, dtype)
    N, B, V = model.pe.shape[0], cond.shape[0], verts.shape[1]
    c = _frame_part(pk, cond, model.cond_masks)
    fv = _face_vertices(model)
    shell = model.normal_offset is not None
    dev = verts.device
    means = torch.empty(B, N, 3, device=dev, dtype=torch.float32)
    quats = torch.empty(B, N, 4, device=dev, dtype=torch.float32)
    scales = torch.empty(B, N, 3, device=dev, dtype=torch.float32)
    _gaussians_kernel[(triton.cdiv(N, block_m), B)](
        *_mlp_args(pk, model.pe, c, model.cond_group),
        verts.float().contiguous(), fv, model.bary.float().contiguous(),
        model.normal_offset if shell else means, model.normal_sign if shell else means,
        model.rotation.float().contiguous(), model.log_scale.float().contiguous(),
        means, quats, scales, N, pk.pe_dim, c.shape[1], V, float(model.cfg.offset_scale), SHELL=shell,
        **_mlp_consts(pk, model.cond_group, dtype, block_m, num_warps))
    return {"means": means, "quats": quats, "scales": scales}


def _face_vertices(model) -> torch.Tensor:
    """[N, 3] int32 vertex ids of each Gaussian's triangle (cached: the faces and face ids never change)."""
    fv = getattr(model, "_triton_face_vertices", None)
    if fv is None or fv.device != model.face_idx.device:
        fv = model.head.faces[model.face_idx].to(torch.int32).contiguous()
        model._triton_face_vertices = fv
    return fv
