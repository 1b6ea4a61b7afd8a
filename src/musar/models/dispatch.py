"""Every attention kernel call of MUSAR goes through diffusers' attention dispatch.

diffusers picks the kernel of an attention call with ``dispatch_attention_fn``: the processor's
``_attention_backend`` (``model.set_attention_backend(...)``), else the active backend (the
``attention_backend(...)`` context manager, ``DIFFUSERS_ATTN_BACKEND``, default ``native`` =
``F.scaled_dot_product_attention``). MUSAR's routed attention is several such calls per layer
(the S* affinity, one unmasked call per token group in ``fast``, one masked call in
``reference``), and each of them is dispatched here, so a backend chosen the diffusers way is
honoured everywhere. Only the ``flex`` routing backend calls FlexAttention itself (see
:mod:`musar.models.flex` for why).

MUSAR works on (B, H, L, d) tensors, as SDPA does; the dispatcher takes (B, L, H, d). The
transposes below are views, and the ``native`` backend transposes back before SDPA, so
``native`` runs SDPA on exactly the tensors (values and strides) a direct call would.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _check_attention_backend_requirements,
    dispatch_attention_fn,
)

from musar.errors import MusarError

KernelBackend = AttentionBackendName | str | None  # None: the active backend (diffusers' rule)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, backend: KernelBackend = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` through diffusers' dispatch."""
    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, backend=backend)
    return out.transpose(1, 2)


def backend_name(backend: KernelBackend) -> AttentionBackendName:
    """The backend a call with ``backend`` runs on (the active one for ``None``)."""
    if backend is None:
        return _AttentionBackendRegistry.get_active_backend()[0]
    if isinstance(backend, AttentionBackendName):
        return backend
    try:
        return AttentionBackendName(backend)
    except ValueError:
        known = ", ".join(sorted(b.value for b in AttentionBackendName))
        raise MusarError(f"unknown attention backend {backend!r}; expected one of {known}") from None


def check_backend(backend: KernelBackend, q: torch.Tensor, routing: str) -> None:
    """Refuse, in one line, a backend that cannot serve MUSAR's ``routing`` on tensors like ``q``.

    diffusers checks a backend's requirements (its package) when it is set, and the
    constraints it declares (device, dtype, shapes) only with ``DIFFUSERS_ATTN_CHECKS=1``. A
    routed layer makes several kernel calls, and a failure deep inside one of them reads badly,
    so before the first call of a forward (not inside a compiled graph) MUSAR runs both checks
    and one call on a single token, which finds kernels this device lacks (e.g. cuDNN on CPU).
    """
    name = backend_name(backend)
    if name not in _AttentionBackendRegistry._backends:
        raise MusarError(f"attention backend {name.value!r} is not registered in this diffusers installation")
    x = q.transpose(1, 2)  # the dispatcher's (B, L, H, d)
    try:
        _check_attention_backend_requirements(name)
        for constraint in _AttentionBackendRegistry._constraints.get(name, []):
            constraint(query=x, key=x, value=x, attn_mask=None, is_causal=False)
        probe = x[:1, :1].detach()
        with torch.no_grad():  # nothing for autograd (or a checkpoint's recomputation) to see
            dispatch_attention_fn(probe, probe, probe, backend=name)
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MusarError(
            f"attention backend {name.value!r} cannot run MUSAR's {routing!r} routing on {q.device.type} "
            f"in {str(q.dtype).removeprefix('torch.')}: {reason}"
        ) from None


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, backend: KernelBackend, routing: str
) -> torch.Tensor:
    """:func:`attention` with a boolean mask; a backend that refuses masks is named with the way out."""
    try:
        return attention(q, k, v, mask, backend=backend)
    except ValueError as err:
        raise MusarError(
            f"attention backend {backend_name(backend).value!r} cannot take the mask of MUSAR's {routing!r} routing "
            f"({err}); use RoutingOptions(backend='flex'), or 'fast' outside torch.compile"
        ) from None
