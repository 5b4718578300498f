"""The deformation MLP of a rendering frame as one Triton kernel (issue 15 item 3).

``DeformMLP`` in torch is a chain of matmuls, each writing its [B, N, W] activations to memory and
the next reading them back (at batch 64 with the paper's 19k Gaussians, about 1.3 GB per layer in
bf16), plus a graph node per operation.  Here one program takes ``block_m`` Gaussians of one frame
through every layer with the activations in registers: the first layer (position-encoding part plus
the frame's condition part, gathered per Gaussian's condition mask), the hidden layers with bias and
ReLU, and the output layer with tanh.  Only the weights are read per program (from L2).

The activations are held as two column halves ``h_a``, ``h_b`` of [block_m, W/2]: every layer is
four [block_m, W/2] x [W/2, W/2] products, so a product's weight operand is 32 KB in bf16 (64 KB in
fp32) whatever W is, and nothing needs concatenating registers.  The layer loop is a real loop (not
unrolled): unrolled, the compiler hoists every layer's weight loads and spills.  Compiled offline for
sm_90 (benchmarks/triton_offline_compile.py): bf16, block_m 64, 8 warps: 186 registers, no spill, 44 KB
shared memory.  fp32 weights do not fit shared memory at width 256 on a GPU (the model keeps the torch
MLP there); the interpreter runs them for the exact comparison.

Rendering only (no backward): ``FlashAvatarModel.gaussians`` uses it where nothing needs a gradient
and ``mlp_kernel == "triton"``.  The torch MLP is the reference: fp32 weights give its values to
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
def _mlp_kernel(pe_ptr, pe_w_ptr, pe_b_ptr, c_ptr, group_ptr, hid_w_ptr, hid_b_ptr, out_w_ptr, out_b_ptr, out_ptr,
                N, P, U,
                W: tl.constexpr, P_PAD: tl.constexpr, L: tl.constexpr, N_OUT: tl.constexpr, OUT_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, HAS_GROUP: tl.constexpr, PREC: tl.constexpr):
    Q: tl.constexpr = W // 4
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
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
    o = 2.0 * tl.sigmoid(2.0 * o) - 1.0
    optr = out_ptr + (b * N + rows)[:, None] * N_OUT + oc[None, :]
    tl.store(optr, o, mask=rmask[:, None] & (oc[None, :] < N_OUT))


def deform_mlp_triton(mlp, pe: torch.Tensor, cond: torch.Tensor, masks: torch.Tensor | None = None,
                      group: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                      block_m: int = 64, num_warps: int = 8) -> torch.Tensor:
    """``mlp(pe, cond, masks, group)`` for rendering, [B, N, n_out] fp32; ``dtype``: the matmuls' input
    type (bf16: the torch MLP's autocast path; fp32: exact products)."""
    if pe.device.type == "cuda" and dtype == torch.float32:
        raise ValueError("the fused MLP runs in bf16 or fp16 on CUDA (fp32 weight tiles do not fit shared memory)")
    pk = packed_for(mlp, dtype)
    N, B = pe.shape[0], cond.shape[0]
    # the per-frame part is [B, U, W]: tiny, in torch; gathered per Gaussian inside the kernel
    if masks is None:
        c = (cond.float() @ pk.cond_w)[:, None]
    else:
        c = (cond.float()[:, None, :] * masks[None].float()) @ pk.cond_w
    c = c.contiguous()
    out = torch.empty(B, N, pk.n_out, device=pe.device, dtype=torch.float32)
    grid = (triton.cdiv(N, block_m), B)
    _mlp_kernel[grid](pe.contiguous(), pk.pe_w, pk.pe_b, c, group if group is not None else c, pk.hid_w, pk.hid_b,
                      pk.out_w, pk.out_b, out, N, pk.pe_dim, c.shape[1],
                      W=pk.width, P_PAD=pk.pe_w.shape[0], L=pk.hid_w.shape[0], N_OUT=pk.n_out, OUT_PAD=OUT_PAD,
                      BLOCK_M=block_m, HAS_GROUP=group is not None,
                      PREC="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps)
    return out
