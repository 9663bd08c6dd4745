"""Depthwise convolution kernels of the CUDA backend (``kernels/depthwise.cu``), with the
semantics of ``sparsecnn._cpu.depthwise_forward`` / ``depthwise_backward``.

One thread per (output, channel) over the output window (forward), one per (input, channel)
over the input window (input gradient); the weight gradient in fixed chunks of each offset's
pairs, then the chunks in order. No float atomics: bitwise identical results run to run.
The window tables come from the rulebook's cache (``_float._window`` / ``_input_window``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._float import _input_window, _launch_flat, _sfx, _window, xp_of

__all__ = ["depthwise_forward", "depthwise_backward"]

WGRAD_CHUNK = 256           # pairs per weight-gradient partial, on average
WGRAD_MAX_SPLIT = 32        # partials per offset, at most


def depthwise_forward(features: Any, weight: Any, row: Any, g_in: Any, rb) -> Any:
    """out[o, c] = row[c] + sum over the pairs (i, o, k) of weight[k, c] (features[i, c] -
    g_in[c]). features (n_in, C); weight (K, C); row, g_in (C,). Returns (n_out, C)."""
    xp = xp_of(features)
    K, C = (int(v) for v in weight.shape)
    n_out = int(rb.n_out)
    out = xp.empty((n_out, C), dtype=features.dtype)
    if n_out == 0 or C == 0:
        return out
    _launch_flat("depthwise.cu", f"scnn_dw_fwd_{_sfx(features)}", features, n_out * C,
                 (features, weight, row, g_in, _window(rb), np.int64(n_out), np.int32(K),
                  np.int32(C), out))
    return out


def _wgrad(features, weight, g_in, grad_out, rb) -> Any:
    xp = xp_of(features)
    K, C = (int(v) for v in weight.shape)
    gw = xp.zeros((K, C), dtype=features.dtype)
    P = int(rb.in_idx.shape[0])
    if P == 0 or C == 0:
        return gw
    # S partials per offset from the sizes only (no read of the pair counts)
    S = int(min(WGRAD_MAX_SPLIT, max(1, -(-P // (K * WGRAD_CHUNK)))))
    partial = xp.empty((K, S, C), dtype=features.dtype)
    sfx = _sfx(features)
    _launch_flat("depthwise.cu", f"scnn_dw_wgrad_partial_{sfx}", features, K * S * C,
                 (features, g_in, grad_out, rb.in_idx, rb.out_idx, rb.offsets, np.int32(K),
                  np.int32(S), np.int32(C), partial))
    _launch_flat("depthwise.cu", f"scnn_dw_wgrad_reduce_{sfx}", features, K * C,
                 (partial, np.int32(K), np.int32(S), np.int32(C), gw))
    return gw


def depthwise_backward(features: Any, weight: Any, g_in: Any, grad_out: Any, rb, *,
                       grad_input: bool = True):
    """(grad_features (n_in, C) or None with grad_input=False, grad_weight (K, C)) of
    depthwise_forward's pair sum:

    grad_features[i, c] = sum over pairs (i, o, k) of weight[k, c] grad_out[o, c]
    grad_weight[k, c] = sum over pairs (i, o) of offset k of (features[i, c] - g_in[c])
    grad_out[o, c] (without the ground term, which the op adds, as for conv_backward)."""
    xp = xp_of(features)
    K, C = (int(v) for v in weight.shape)
    gx = None
    if grad_input:
        n_in = int(features.shape[0])
        gx = xp.empty((n_in, C), dtype=features.dtype)
        if n_in and C:
            _launch_flat("depthwise.cu", f"scnn_dw_dgrad_{_sfx(features)}", features, n_in * C,
                         (grad_out, weight, _input_window(rb), np.int64(n_in), np.int32(K),
                          np.int32(C), gx))
    return gx, _wgrad(features, weight, g_in, grad_out, rb)
