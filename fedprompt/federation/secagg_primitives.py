"""The primitives of secure aggregation (``fedprompt.federation.secagg``): the integer ring Z_{2^k}
that quantised updates are summed in (:class:`RingQuantizer`, ring arithmetic, the ChaCha20 PRG
that expands a seed into a mask) and the key material (X25519 agreement, HKDF-derived keys,
SHA-256 commitments, Shamir shares of 32-byte secrets). Torch- and Flower-free: numpy arrays,
``cryptography`` and ``pycryptodome``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32
"""Length of every secret (X25519 private keys, self-mask seeds, derived keys)."""
SHARE_BYTES = 32
"""Length of one Shamir share of a 32-byte secret (two 16-byte chunk shares)."""
MAX_BITS = 48
"""The widest ring: sums and their float64 images stay exact well within float64's 53 bits."""


# --------------------------------------------------------------------------- the integer ring


@dataclass(frozen=True)
class RingQuantizer:
    """Owns how real-valued updates become elements of Z_{2^bits} and how their sum comes back.

    With ``n`` sampled clients, ``levels`` L = ⌊(2^(bits−1) − 1) / n⌋ and ``scale`` s = L / c for
    ``clip_range`` c: a client clips each coordinate of its update Δ to [−c, c], multiplies it by its
    public weight p ∈ (0, 1] and sends q = round(s · p · clip(Δ)) ∈ [−L, L] (two's complement in the
    ring). Any sum of at most n such values lies in [−nL, nL] ⊂ (−2^(bits−1), 2^(bits−1)), so the
    ring sum decodes to the exact integer sum. The weighted mean Σ p_k clip(Δ_k) / Σ p_k then comes
    back as Σ q_k / (s · Σ p_k), off by at most (number summed) / (2 s Σ p_k) per coordinate (each
    q_k is within 1/2 of s · p_k · clip(Δ_k); float64 rounding adds relative errors of 1e-16): that
    is c / (2L) with uniform weights. ``bits`` is at most :data:`MAX_BITS`.
    """

    clip_range: float
    bits: int
    num_clients: int

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must lie in 2..{MAX_BITS}, got {self.bits}")
        if self.num_clients < 1 or self.levels < 1:
            raise ValueError(
                f"{self.num_clients} clients leave no quantisation levels in a ring of 2^{self.bits}; "
                "raise bits"
            )

    @property
    def levels(self) -> int:
        return (2 ** (self.bits - 1) - 1) // self.num_clients

    @property
    def scale(self) -> float:
        return self.levels / self.clip_range

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64(2**self.bits - 1)

    def quantize(self, delta: np.ndarray, weight: float) -> tuple[np.ndarray, int]:
        """(the ring element of ``weight`` · ``delta``, clipped; how many coordinates were clipped)."""
        if not 0 < weight <= 1:
            raise ValueError(f"a secure-aggregation weight lies in (0, 1], got {weight}")
        values = np.asarray(delta, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the update has non-finite values")
        clipped = int(np.count_nonzero(np.abs(values) > self.clip_range))
        q = np.rint(np.clip(values, -self.clip_range, self.clip_range) * (weight * self.scale))
        q = np.clip(q, -self.levels, self.levels).astype(np.int64)  # rounding never leaves [-L, L]
        return q.view(np.uint64) & self.modulus_mask, clipped

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """The signed integers (int64) that ring elements stand for."""
        values = np.asarray(ring, dtype=np.uint64) & self.modulus_mask
        high = (values >> np.uint64(self.bits - 1)).astype(bool)
        signed = values.astype(np.int64)
        signed[high] -= np.int64(2**self.bits)
        return signed

    def mean(self, ring_sum: np.ndarray, total_weight: float) -> np.ndarray:
        """Σ p_k clip(Δ_k) / Σ p_k (float64) from the ring sum of the q_k and Σ p_k."""
        if not total_weight > 0:
            raise ValueError(f"total weight must be > 0, got {total_weight}")
        return self.decode(ring_sum).astype(np.float64) / (self.scale * total_weight)

    def max_error(self, num_summed: int, total_weight: float) -> float:
        """The largest quantisation error of one coordinate of :meth:`mean` (no clipping)."""
        return num_summed / (2 * self.scale * total_weight)


def ring_add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a + b) mod 2^bits, elementwise on uint64 arrays."""
    return (a + b) & np.uint64(2**bits - 1)


def ring_sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """(a − b) mod 2^bits, elementwise on uint64 arrays."""
    return (a - b) & np.uint64(2**bits - 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^bits} (uint64) from a 32-byte seed: the ChaCha20 keystream."""
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)
    return words & np.uint64(2**bits - 1)


# --------------------------------------------------------------------------- key material


def derive_key(secret: bytes, purpose: str, round_num: int, a: int, b: int) -> bytes:
    """A 32-byte key for ``purpose`` between clients a and b (order-free) in ``round_num``."""
    low, high = sorted((a, b))
    info = f"fedprompt-secagg|{purpose}|{round_num}|{low}|{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(secret)


def agree(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def new_key_pair() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return private, public_key(private)


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: what the server checks a rebuilt seed against."""
    return hashlib.sha256(seed).digest()


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of a 32-byte secret, any ``threshold`` of which rebuild it; share i
    (0-based) has Shamir index i + 1."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    halves = [Shamir.split(threshold, count, secret[i : i + 16], ssss=False) for i in (0, 16)]
    return [first[1] + second[1] for first, second in zip(*halves, strict=True)]


def combine_secret(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares keyed by their 0-based position (as :func:`split_secret` made them)."""
    halves = []
    for offset in (0, 16):
        halves.append(
            Shamir.combine(
                [(index + 1, share[offset : offset + 16]) for index, share in shares.items()], ssss=False
            )
        )
    return halves[0] + halves[1]
