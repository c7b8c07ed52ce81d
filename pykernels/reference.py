"""NumPy float64 reference implementations: the truth every kernel is tested against.

Deliberately plain: explicit loops over kernel taps plus einsum, everything in float64.
This module imports nothing else from pykernels, so it stays an independent truth; it does
its own small argument normalisation and assumes the arguments are otherwise valid.

Conventions (see docs/design): NCHW, weights (K, C/groups, R, S), cross-correlation (no flip),
padding int | (ph, pw) | ((top, bottom), (left, right)) | 'valid' | 'same' (TensorFlow rule).
"""

import numpy as np

__all__ = [
    "normalize_padding",
    "conv2d",
    "conv2d_backward",
    "relu",
    "relu_backward",
    "max_pool2d",
    "max_pool2d_backward",
]


# ----------------------------------------------------------------------------- arguments

def _pair(v):
    """int -> (v, v); (a, b) -> (a, b)."""
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    a, b = v
    return (int(a), int(b))


def normalize_padding(padding, in_hw, kernel_hw, stride_hw=1, dilation_hw=1):
    """Return ((top, bottom), (left, right)).

    padding: int, (ph, pw), ((top, bottom), (left, right)), 'valid' or 'same'.
    'same' follows TensorFlow: out = ceil(in / stride),
    total = max((out - 1) * stride + dilation * (k - 1) + 1 - in, 0),
    begin = total // 2, end = total - begin (the extra row/column goes bottom/right).
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0), (0, 0))
        if mode == "same":
            result = []
            for n, k, s, d in zip(_pair(in_hw), _pair(kernel_hw), _pair(stride_hw), _pair(dilation_hw)):
                out = -(-n // s)  # ceil(n / s)
                total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
                begin = total // 2
                result.append((begin, total - begin))
            return (result[0], result[1])
        raise ValueError(f"unknown padding string {padding!r}")
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return ((p, p), (p, p))
    ph, pw = padding
    if isinstance(ph, (int, np.integer)) and isinstance(pw, (int, np.integer)):
        return ((int(ph), int(ph)), (int(pw), int(pw)))
    return (_pair(ph), _pair(pw))


def _conv_out_size(n, pad_begin, pad_end, k, s, d):
    return (n + pad_begin + pad_end - d * (k - 1) - 1) // s + 1


def _pool_out_size(n, pad_begin, pad_end, k, s, d, ceil_mode):
    span = n + pad_begin + pad_end - d * (k - 1) - 1
    if ceil_mode:
        out = -(-span // s) + 1
        # PyTorch rule: drop a last window that would start in the end padding.
        if (out - 1) * s >= n + pad_begin:
            out -= 1
    else:
        out = span // s + 1
    return out


# ----------------------------------------------------------------------------- conv2d

def _conv_setup(x_shape, w_shape, stride, padding, dilation, groups):
    N, C, H, W = x_shape
    K, Cg, R, S = w_shape
    if C != Cg * groups or K % groups != 0:
        raise ValueError(f"bad channels: x C={C}, weight {w_shape}, groups={groups}")
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    (pt, pb), (pl, pr) = normalize_padding(padding, (H, W), (R, S), (sh, sw), (dh, dw))
    P = _conv_out_size(H, pt, pb, R, sh, dh)
    Q = _conv_out_size(W, pl, pr, S, sw, dw)
    if P < 1 or Q < 1:
        raise ValueError(f"empty conv output ({P}, {Q})")
    return (N, C, H, W, K, Cg, R, S, sh, sw, dh, dw, pt, pb, pl, pr, P, Q)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y[n, k, p, q] = b[k] + sum_{c, r, s} xpad[n, g*Cg + c, p*sh + r*dh, q*sw + s*dw] * w[k, c, r, s]."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    (N, C, H, W, K, Cg, R, S, sh, sw, dh, dw, pt, pb, pl, pr, P, Q) = _conv_setup(
        x.shape, w.shape, stride, padding, dilation, groups)
    Kg = K // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    y = np.zeros((N, K, P, Q), dtype=np.float64)
    for g in range(groups):
        xg = xp[:, g * Cg:(g + 1) * Cg]
        wg = w[g * Kg:(g + 1) * Kg]
        for r in range(R):
            for s in range(S):
                h0 = r * dh
                w0 = s * dw
                patch = xg[:, :, h0:h0 + (P - 1) * sh + 1:sh, w0:w0 + (Q - 1) * sw + 1:sw]  # (N, Cg, P, Q)
                y[:, g * Kg:(g + 1) * Kg] += np.einsum("ncpq,kc->nkpq", patch, wg[:, :, r, s])
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64).reshape(1, K, 1, 1)
    return y


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """Return (grad_x, grad_w, grad_b) of conv2d for upstream gradient grad_out (N, K, P, Q)."""
    go = np.asarray(grad_out, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    (N, C, H, W, K, Cg, R, S, sh, sw, dh, dw, pt, pb, pl, pr, P, Q) = _conv_setup(
        x.shape, w.shape, stride, padding, dilation, groups)
    if go.shape != (N, K, P, Q):
        raise ValueError(f"grad_out shape {go.shape} != expected {(N, K, P, Q)}")
    Kg = K // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for g in range(groups):
        cs = slice(g * Cg, (g + 1) * Cg)
        ks = slice(g * Kg, (g + 1) * Kg)
        gog = go[:, ks]
        for r in range(R):
            for s in range(S):
                hsl = slice(r * dh, r * dh + (P - 1) * sh + 1, sh)
                wsl = slice(s * dw, s * dw + (Q - 1) * sw + 1, sw)
                patch = xp[:, cs, hsl, wsl]  # (N, Cg, P, Q)
                gw[ks, :, r, s] += np.einsum("nkpq,ncpq->kc", gog, patch)
                gxp[:, cs, hsl, wsl] += np.einsum("nkpq,kc->ncpq", gog, w[ks, :, r, s])
    gx = gxp[:, :, pt:pt + H, pl:pl + W].copy()
    gb = go.sum(axis=(0, 2, 3))
    return gx, gw, gb


# ----------------------------------------------------------------------------- relu

def relu(x):
    """max(x, 0); NaN propagates (np.maximum returns NaN if either operand is NaN)."""
    return np.maximum(np.asarray(x, dtype=np.float64), 0.0)


def relu_backward(grad_out, y):
    """grad_out where y > 0, else 0 (so 0 at y == 0 and where y is NaN)."""
    go = np.asarray(grad_out, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 0, go, 0.0)


# ----------------------------------------------------------------------------- max_pool2d

def _pool_setup(input_shape, kernel_size, stride, padding, dilation, ceil_mode):
    N, C, H, W = input_shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    dh, dw = _pair(dilation)
    (pt, pb), (pl, pr) = normalize_padding(padding, (H, W), (kh, kw), (sh, sw), (dh, dw))
    P = _pool_out_size(H, pt, pb, kh, sh, dh, ceil_mode)
    Q = _pool_out_size(W, pl, pr, kw, sw, dw, ceil_mode)
    if P < 1 or Q < 1:
        raise ValueError(f"empty pool output ({P}, {Q})")
    return (N, C, H, W, kh, kw, sh, sw, dh, dw, pt, pl, P, Q)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Return (y, indices); indices are int64 flat offsets h * W + w into each input plane.

    Padded cells (and cells past the input that ceil_mode windows reach) act as -inf and are never
    chosen. Taps are visited in row-major window order; a later tap replaces the current best only
    if it is strictly greater, or NaN while the best is not NaN. So ties go to the first maximum,
    the first NaN wins, and a window of only -inf keeps its first in-bounds cell.
    """
    x = np.asarray(x, dtype=np.float64)
    (N, C, H, W, kh, kw, sh, sw, dh, dw, pt, pl, P, Q) = _pool_setup(
        x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    best = np.full((N, C, P, Q), -np.inf, dtype=np.float64)
    idx = np.full((N, C, P, Q), -1, dtype=np.int64)
    for r in range(kh):
        hs = np.arange(P) * sh + r * dh - pt  # input rows of this tap, one per output row
        for s in range(kw):
            ws = np.arange(Q) * sw + s * dw - pl
            inb = ((hs >= 0) & (hs < H))[:, None] & ((ws >= 0) & (ws < W))[None, :]  # (P, Q)
            hc = np.clip(hs, 0, H - 1)
            wc = np.clip(ws, 0, W - 1)
            v = x[:, :, hc[:, None], wc[None, :]]  # (N, C, P, Q)
            flat = (hs[:, None] * W + ws[None, :]).astype(np.int64)  # (P, Q)
            take = inb & (
                (idx == -1)
                | (~np.isnan(best) & ((v > best) | np.isnan(v)))
            )
            best = np.where(take, v, best)
            idx = np.where(take, np.broadcast_to(flat, idx.shape), idx)
    if (idx == -1).any():
        raise ValueError("a pooling window lies wholly in the padding")
    return best, idx


def max_pool2d_backward(grad_out, indices, input_shape, kernel_size, stride=None, padding=0,
                        dilation=1, ceil_mode=False):
    """grad_x: each grad_out value is added to the input cell its index names."""
    go = np.asarray(grad_out, dtype=np.float64)
    ind = np.asarray(indices, dtype=np.int64)
    (N, C, H, W, kh, kw, sh, sw, dh, dw, pt, pl, P, Q) = _pool_setup(
        tuple(input_shape), kernel_size, stride, padding, dilation, ceil_mode)
    if go.shape != (N, C, P, Q) or ind.shape != (N, C, P, Q):
        raise ValueError(f"grad_out {go.shape} / indices {ind.shape} != expected {(N, C, P, Q)}")
    gx = np.zeros((N, C, H * W), dtype=np.float64)
    n_i, c_i = np.meshgrid(np.arange(N), np.arange(C), indexing="ij")
    for p in range(P):
        for q in range(Q):
            np.add.at(gx, (n_i, c_i, ind[:, :, p, q]), go[:, :, p, q])
    return gx.reshape(N, C, H, W)
