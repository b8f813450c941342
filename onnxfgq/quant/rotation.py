"""Orthogonal rotations for the rotation pass (QuaRot / SpinQuant R1 and R2, folded offline). Pure numpy.

A rotation ``R`` (``R @ R.T = I``) applied to the residual stream (``x -> x R``) leaves every RMS norm
unchanged and is undone by the weights that read the stream (``W -> R.T W``), so the float model computes
the same function while its weights lose their outlier rows: a Hadamard spreads each input channel over
all of them, which is what makes int4 with one scale per column (or per group of 128) accurate.

The randomized Hadamard ``diag(s) H / sqrt(n)`` (random signs ``s``) exists for ``n = 2^k`` (Sylvester)
and ``n = 2^k (q + 1)`` for a prime ``q = 3 mod 4`` (Paley I: 12, 20, 24, 44, ...: 384 = 32 x 12,
768 = 64 x 12); other sizes get a seeded random orthogonal matrix (QR of a Gaussian). Everything is
computed in float64 and cast to the weight's dtype at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def sylvester(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order ``n = 2^k``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, not {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def paley(q: int) -> np.ndarray:
    """Paley's construction I: a +-1 Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    if not _is_prime(q) or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, not {q}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=np.float64)
    jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # Jacobsthal: Q[i, j] = chi(j - i)
    s = np.zeros((q + 1, q + 1))
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + np.eye(q + 1)


def hadamard(n: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order ``n`` from the constructions above, or None when none applies."""
    k = 1
    while n % (2 * k) == 0:
        k *= 2
    # n = k * m with m odd; try m' = m * 2^j (j >= 2) as a Paley order, the rest from Sylvester
    two = k
    while two >= 1:
        m = n // two
        if m == 1:
            return sylvester(n)
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return np.kron(sylvester(two), paley(m - 1))
        two //= 2
    return None


@dataclass(frozen=True)
class Rotation:
    """One orthogonal matrix and how it was made (for the report)."""

    matrix: np.ndarray  # float64 [n, n], orthogonal
    kind: str  # "randomized Hadamard" | "random orthogonal"

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]  # the sign fix makes the distribution uniform (Haar)


def make_rotation(n: int, seed: int, stream: int = 0) -> Rotation:
    """The rotation of order ``n`` for ``seed``; ``stream`` tells independent rotations of one model apart
    (R1 is stream 0, layer i's R2 is stream i + 1)."""
    rng = np.random.default_rng([seed, stream, n])
    h = hadamard(n)
    if h is None:
        return Rotation(random_orthogonal(n, rng), "random orthogonal")
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    return Rotation(signs[:, None] * h / np.sqrt(n), "randomized Hadamard")


# ------------------------------------------------------------------------------ applying to weights
def _cast(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return x.astype(like.dtype, copy=False)


def rotate_input(w: np.ndarray, r: np.ndarray, gamma: np.ndarray | None = None, *,
                 center: bool = False) -> np.ndarray:
    """A weight ``[K, N]`` that reads the rotated, unscaled stream: ``R.T diag(gamma) W``; with ``center``
    ``R.T C diag(gamma) W`` (``C = I - 11^T/K``), equal on a mean-free input and keeping a tied
    embedding tied (``(E C R)^T``) when gamma is 1."""
    w64 = np.asarray(w, np.float64)
    if gamma is not None:
        w64 = np.asarray(gamma, np.float64)[:, None] * w64
    if center:
        w64 = w64 - w64.mean(0, keepdims=True)
    return _cast(r.T @ w64, w)


def rotate_output(w: np.ndarray, r: np.ndarray, *, center: bool = False) -> np.ndarray:
    """A weight ``[..., N]`` (or a bias ``[N]``, an embedding table ``[V, N]``) whose output joins the
    rotated stream: ``W R`` over the last axis; with ``center`` ``W C R``, so the stream is mean-free
    (what a LayerNorm turned RMS norm needs)."""
    w64 = np.asarray(w, np.float64)
    if center:
        w64 = w64 - w64.mean(-1, keepdims=True)
    return _cast(w64 @ r, w)


def shifted_bias(bias: np.ndarray | None, beta: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A reader's bias with a norm's shift ``beta`` folded in: ``b + beta W`` (``w`` is ``[K, N]``)."""
    out = np.asarray(beta, np.float64) @ np.asarray(w, np.float64)
    if bias is not None:
        out = out + np.asarray(bias, np.float64)
    return out.astype(w.dtype if bias is None else bias.dtype)


def rotate_head_output(w: np.ndarray, r: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of ``w`` (last axis) are heads of ``r``'s size: each head's columns ``W_h R``."""
    d = r.shape[0]
    if (stop - start) % d:
        raise ValueError(f"columns {start}:{stop} are not whole heads of {d}")
    out = np.array(w, np.float64, copy=True)
    part = out[..., start:stop]
    heads = part.reshape(*part.shape[:-1], -1, d) @ r
    out[..., start:stop] = heads.reshape(part.shape)
    return _cast(out, w)


def rotate_head_input(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A weight ``[K, N]`` whose K rows are heads of ``r``'s size: each head's rows ``R.T W_h``."""
    d = r.shape[0]
    k = w.shape[0]
    if k % d:
        raise ValueError(f"{k} rows are not whole heads of {d}")
    w64 = np.asarray(w, np.float64).reshape(k // d, d, -1)
    return _cast(np.einsum("ji,hjn->hin", r, w64).reshape(w.shape), w)


def transposed_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is ``b.T`` up to the float rounding of two rotation orders (a tied embedding and lm_head)."""
    if a.ndim != 2 or a.shape != b.T.shape:
        return False
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.allclose(a, b.T, rtol=0.0, atol=1e-5 * scale))


def ones_like(gamma: np.ndarray) -> np.ndarray:
    """A folded norm scale."""
    return np.ones_like(gamma)


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if a.size else 0.0


__all__ = ["Rotation", "hadamard", "make_rotation", "paley", "random_orthogonal", "rotate_head_input",
           "rotate_head_output", "rotate_input", "rotate_output", "sylvester"]
