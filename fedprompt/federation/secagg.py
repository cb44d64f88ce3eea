"""Secure aggregation: the server learns the sum of the clients' quantised updates, nothing about
any one of them (SecAgg+ of Bell et al., 2020, on the complete graph, after Bonawitz et al., 2017).

One round over the sampled clients U (fedprompt client ids), with threshold t:

0. **keys** — each client u makes two X25519 key pairs, ``c`` (to encrypt what it sends to other
   clients through the server) and ``s`` (to agree pairwise mask seeds), and a random self-mask seed
   b_u; it sends c_pk, s_pk and SHA-256(b_u) (a commitment the server checks b_u against later).
1. **shares** — the server forwards the public keys of the clients U1 that answered; u splits b_u
   and its ``s`` secret key into |U1| Shamir shares with threshold t (pycryptodome, GF(2^128), two
   16-byte chunks per 32-byte secret; share i goes to the i-th client of U1 in id order) and sends
   each other client v its two shares, encrypted with AES-GCM under HKDF(X25519(c_u, c_v)) and
   bound to (round, u, v).
2. **masked input** — the server hands each client of U2 (those that answered 1) the ciphertexts
   meant for it; u quantises its update to the ring Z_{2^k} (:class:`RingQuantizer`) and sends
   y_u = x_u + PRG(b_u) + Σ_{v ∈ U2, v ≠ u} ±PRG(s_uv) mod 2^k (+ for u < v, − for u > v), where
   s_uv = HKDF(X25519(s_u, s_v)) and PRG is the ChaCha20 keystream.
3. **unmask** — the server names the survivors U3 (whose y arrived, less any client whose shares
   fewer than t survivors could decrypt) and the dropped D = U2 \\ U3; each client of U3 answers
   its shares of b_v for v ∈ U3 and of s_v for v ∈ D (those it holds), never both for one client,
   and only when at least t survive; for the dropped clients whose shares too few could read, it
   answers its own pairwise mask key with them instead. From t shares per secret the server rebuilds them
   (checked against the commitment and the public key) and computes
   Σ_{u∈U3} y_u − Σ_{u∈U3} PRG(b_u) ∓ Σ_{u∈U3, v∈D} PRG(s_uv) = Σ_{u∈U3} x_u (mod 2^k).

Pairwise masks of two survivors cancel in the sum; a dropped client's pairwise masks are removed
with its rebuilt ``s`` key; a survivor's self mask is removed with its rebuilt b. The server never
holds both b_u and s_u of one client, so no single y_u can be unmasked. Keys, seeds and shares are
fresh for every round and drawn from the operating system's random source, never from the run
seed (which the server knows); the unmasked sum, and so the run, is deterministic all the same.

**Which server this protects against.** The semi-honest variant of Bonawitz et al.: a server
(and SuperLink) that follows the protocol but reads everything it sees learns the sum of at least
``threshold`` survivors' inputs and nothing else; and each client enforces what it can alone: it
reveals no two secrets of one client, unmasks no fewer than the threshold (or its own
``min_survivors``) survivors, and, through its site's ledger, sends one masked input per (run,
round). It does **not** implement the malicious-server variant: public keys are not signed (with
SuperNode keys or otherwise) and there is no consistency round, so a server that forwards its own
public keys in place of a client's, or tells different clients different survivor lists, can learn
single inputs. Sybils are kept out by binding partitions to registered SuperNode keys
(``node-keys`` on Flower), not here. A client cannot stop a round: wrongly sized ciphertexts drop
their sender at the shares stage; ciphertexts that do not decrypt drop their sender when too few
others hold its shares (its pairwise masks then come off with the survivors' own mask keys with
it, which reveals no more than rebuilding its ``s`` key would); wrong shares in an unmask answer are
outvoted by rebuilding from other subsets of ``threshold`` shares. One thing a client can still do
is encrypt shares of a wrong secret to everyone (a well-formed lie, caught only when the rebuilt
secret fails its commitment): the round then fails naming that client; verifiable secret sharing
would be needed to drop it earlier.

This module is torch- and Flower-free: numpy arrays, ``cryptography`` and ``pycryptodome``.
:class:`ClientSession` keeps its state as plain values (for a Flower ``ConfigRecord``),
:class:`ServerSession` is the server's bookkeeping of one round.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedprompt.federation.secagg_primitives import (
    SECRET_BYTES,
    SHARE_BYTES,
    agree,
    combine_secret,
    commitment,
    derive_key,
    new_key_pair,
    prg,
    public_key,
    ring_add,
    ring_sub,
    split_secret,
)

_NONCE_BYTES = 12
_TAG_BYTES = 16
CIPHERTEXT_BYTES = _NONCE_BYTES + 2 * SHARE_BYTES + _TAG_BYTES
"""The size of every encrypted pair of shares: nonce, the two 32-byte shares, the AES-GCM tag."""
MAX_SUBSETS = 5000
"""How many subsets of ``threshold`` shares the server tries to rebuild one secret when some
shares are wrong (all of them for up to about 14 answering clients at a majority threshold)."""


class SecAggError(RuntimeError):
    """A secure-aggregation step cannot go on (too few clients left, or a message that breaks the
    protocol); the message says why."""


def _aad(round_num: int, src: int, dst: int) -> bytes:
    return f"fedprompt-secagg|shares|{round_num}|{src}|{dst}".encode()


# --------------------------------------------------------------------------- the client side


@dataclass
class ClientSession:
    """Owns one client's side of one secure round: its secret keys and self-mask seed, the public
    keys and order of the clients that took part, and the shares others gave it. ``to_record`` and
    ``from_record`` turn it into plain values (ints, bytes and their lists) and back, so it can live
    in a Flower node's context between the messages of the round."""

    client_id: int
    round: int
    threshold: int
    participants: list[int]
    c_sk: bytes
    s_sk: bytes
    seed: bytes
    stage: str = "keys"
    order: tuple[int, ...] = ()
    """U1 in id order: a client's position in it is the index of the shares it holds."""
    c_pks: tuple[bytes, ...] = ()
    s_pks: tuple[bytes, ...] = ()
    masked_with: tuple[int, ...] = ()
    """U2: the clients this one masked its input with (itself included)."""
    unreadable: tuple[int, ...] = ()
    """Clients of U2 whose encrypted shares did not decrypt (reported to the server beside the
    masked input; this client holds no shares of theirs)."""
    min_survivors: int = 0
    """The fewest survivors this client helps unmask (at least the threshold): a site's pin."""
    held_b: dict[int, bytes] | None = None
    held_s: dict[int, bytes] | None = None

    @classmethod
    def start(
        cls,
        client_id: int,
        round_num: int,
        participants: Sequence[int],
        threshold: int,
        min_survivors: int | None = None,
    ) -> tuple[ClientSession, dict[str, bytes]]:
        """A fresh session and what the client advertises: ``c-pk``, ``s-pk``, ``seed-hash``.
        ``min_survivors`` (default: the threshold) is the fewest clients whose inputs this one lets
        be summed with its own: it refuses fewer participants now and fewer survivors at unmasking."""
        participants = sorted(participants)
        if client_id not in participants:
            raise SecAggError(f"client {client_id} is not among the participants {participants}")
        if len(set(participants)) != len(participants):
            raise SecAggError(f"participants {participants} name a client twice")
        if not 2 <= threshold <= len(participants):
            raise SecAggError(f"threshold {threshold} must lie in 2..{len(participants)} (the participants)")
        pinned = max(threshold, min_survivors or 0)
        if len(participants) < pinned:
            raise SecAggError(
                f"{len(participants)} participants, fewer than the {pinned} this client requires in a round"
            )
        c_sk, c_pk = new_key_pair()
        s_sk, s_pk = new_key_pair()
        seed = os.urandom(SECRET_BYTES)
        session = cls(client_id, round_num, threshold, participants, c_sk, s_sk, seed, min_survivors=pinned)
        return session, {"c-pk": c_pk, "s-pk": s_pk, "seed-hash": commitment(seed)}

    def share(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: from the (c_pk, s_pk) of every client that advertised (U1), the encrypted
        shares for each other client, by destination."""
        self._expect("keys", "shares")
        order = sorted(public_keys)
        if not set(order) <= set(self.participants) or self.client_id not in order:
            raise SecAggError(
                f"key list {order} is not a subset of {self.participants} with client {self.client_id}"
            )
        if len(order) < self.threshold:
            raise SecAggError(
                f"only {len(order)} clients advertised keys, fewer than the threshold {self.threshold}"
            )
        if public_keys[self.client_id] != (public_key(self.c_sk), public_key(self.s_sk)):
            raise SecAggError("the server forwarded other public keys for this client than it advertised")
        self.order = tuple(order)
        self.c_pks = tuple(public_keys[v][0] for v in order)
        self.s_pks = tuple(public_keys[v][1] for v in order)
        b_shares = split_secret(self.seed, self.threshold, len(order))
        s_shares = split_secret(self.s_sk, self.threshold, len(order))
        out = {}
        for position, v in enumerate(order):
            if v == self.client_id:
                self.held_b = {v: b_shares[position]}
                self.held_s = {v: s_shares[position]}
                continue
            key = derive_key(agree(self.c_sk, self.c_pks[position]), "channel", self.round, self.client_id, v)
            nonce = os.urandom(_NONCE_BYTES)
            plain = b_shares[position] + s_shares[position]
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, _aad(self.round, self.client_id, v))
        return out

    def mask(self, ciphertexts: Mapping[int, bytes], quantized: np.ndarray, bits: int) -> np.ndarray:
        """Stage 2: keep the shares the other clients of U2 sent (``ciphertexts``, by source), and
        mask the ring element ``quantized`` with the self mask and a pairwise mask per client of U2.

        A ciphertext of the wrong size, or one that does not decrypt to two shares, is not this
        client's problem: it holds no shares of that sender, names it in ``unreadable`` (which goes
        to the server beside the masked input) and masks with it as with any other client of U2."""
        self._expect("shares", "masked")
        assert self.held_b is not None and self.held_s is not None
        sources = sorted(ciphertexts)
        if not set(sources) <= set(self.order) - {self.client_id}:
            raise SecAggError(f"shares from {sources}, which did not all take part in the key exchange")
        if len(sources) + 1 < self.threshold:
            raise SecAggError(
                f"shares from {len(sources)} other clients: with this one, fewer than the threshold "
                f"{self.threshold}"
            )
        unreadable = []
        for src in sources:
            plain = self._decrypt(src, ciphertexts[src])
            if plain is None:
                unreadable.append(src)
                continue
            self.held_b[src], self.held_s[src] = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        self.unreadable = tuple(unreadable)
        self.masked_with = (*sources, self.client_id)
        length = quantized.shape[0]
        masked = ring_add(np.asarray(quantized, dtype=np.uint64), prg(self._self_key(), length, bits), bits)
        for v in sources:
            pairwise = prg(self._pair_key(v), length, bits)
            masked = (
                ring_add(masked, pairwise, bits) if self.client_id < v else ring_sub(masked, pairwise, bits)
            )
        return masked

    def _decrypt(self, src: int, data: bytes) -> bytes | None:
        """The two shares ``src`` encrypted for this client, or None when ``data`` is not that."""
        if not isinstance(data, bytes) or len(data) != CIPHERTEXT_BYTES:
            return None
        position = self.order.index(src)
        key = derive_key(agree(self.c_sk, self.c_pks[position]), "channel", self.round, self.client_id, src)
        try:
            return AESGCM(key).decrypt(
                data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(self.round, src, self.client_id)
            )
        except (InvalidTag, ValueError):
            return None

    def unmask(
        self, survivors: Sequence[int], dropped: Sequence[int], reveal: Sequence[int] = ()
    ) -> tuple[dict[int, bytes], dict[int, bytes], dict[int, bytes]]:
        """Stage 3: (shares of b_v for each survivor v, shares of s_v for each dropped v, this
        client's pairwise mask key with each v of ``reveal``), after checking that the two lists split
        U2, that ``reveal`` names dropped clients only, and that at least ``threshold`` (and this
        client's ``min_survivors``) clients survived. Shares this client does not hold (their
        sender's ciphertext was unreadable) are left out.

        ``reveal``: dropped clients whose secrets too few clients hold to be rebuilt (they sent
        unreadable shares); their pairwise masks come off with the survivors' own mask keys with
        them, which tell the server nothing it would not learn from their rebuilt ``s`` key."""
        self._expect("masked", "unmask")
        assert self.held_b is not None and self.held_s is not None
        alive, gone = set(survivors), set(dropped)
        if alive & gone or alive | gone != set(self.masked_with) or self.client_id not in alive:
            raise SecAggError(
                f"survivors {sorted(alive)} and dropped {sorted(gone)} do not split the clients "
                f"{sorted(self.masked_with)} this one masked with"
            )
        if not set(reveal) <= gone:
            raise SecAggError(
                f"asked for the mask keys with {sorted(set(reveal) - gone)}, which did not drop: that would "
                "unmask their inputs"
            )
        needed = max(self.threshold, self.min_survivors)
        if len(alive) < needed:
            raise SecAggError(
                f"{len(alive)} clients survived, fewer than the threshold {self.threshold}"
                + (f" (this site requires {needed})" if needed > self.threshold else "")
                + "; unmasking would reveal too much"
            )
        return (
            {v: self.held_b[v] for v in sorted(alive) if v in self.held_b},
            {v: self.held_s[v] for v in sorted(gone) if v in self.held_s},
            {v: self._pair_key(v) for v in sorted(set(reveal))},
        )

    def _self_key(self) -> bytes:
        return derive_key(self.seed, "self-mask", self.round, self.client_id, self.client_id)

    def _pair_key(self, other: int) -> bytes:
        peer = self.s_pks[self.order.index(other)]
        return derive_key(agree(self.s_sk, peer), "mask", self.round, self.client_id, other)

    def _expect(self, stage: str, then: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"stage {then!r} arrived after stage {self.stage!r}, expected it after {stage!r}"
            )
        self.stage = then

    def to_record(self) -> dict[str, Any]:
        """The session as plain values: ints, bytes, and lists of either."""
        held_b, held_s = self.held_b or {}, self.held_s or {}
        return {
            "client-id": self.client_id,
            "round": self.round,
            "threshold": self.threshold,
            "participants": list(self.participants),
            "c-sk": self.c_sk,
            "s-sk": self.s_sk,
            "seed": self.seed,
            "stage": self.stage,
            "order": list(self.order),
            "c-pks": list(self.c_pks),
            "s-pks": list(self.s_pks),
            "masked-with": list(self.masked_with),
            "unreadable": list(self.unreadable),
            "min-survivors": self.min_survivors,
            "held-from": sorted(held_b),
            "held-b": [held_b[v] for v in sorted(held_b)],
            "held-s": [held_s[v] for v in sorted(held_s)],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ClientSession:
        held = list(record["held-from"])
        return cls(
            client_id=int(record["client-id"]),
            round=int(record["round"]),
            threshold=int(record["threshold"]),
            participants=list(record["participants"]),
            c_sk=bytes(record["c-sk"]),
            s_sk=bytes(record["s-sk"]),
            seed=bytes(record["seed"]),
            stage=str(record["stage"]),
            order=tuple(record["order"]),
            c_pks=tuple(record["c-pks"]),
            s_pks=tuple(record["s-pks"]),
            masked_with=tuple(record["masked-with"]),
            unreadable=tuple(record["unreadable"]),
            min_survivors=int(record["min-survivors"]),
            held_b=dict(zip(held, record["held-b"], strict=True)) if held else None,
            held_s=dict(zip(held, record["held-s"], strict=True)) if held else None,
        )


# --------------------------------------------------------------------------- the server side


@dataclass
class _Advertised:
    c_pk: bytes
    s_pk: bytes
    seed_hash: bytes


class ServerSession:
    """Owns the server's side of one secure round: who advertised which keys, the encrypted shares
    it forwards, the masked inputs it sums, the clients that could not read a sender's shares, and
    the unmasking. It sees public keys, ciphertexts and masked vectors only, until the unmask stage
    hands it exactly the seeds that remove the masks. Each ``*_done`` method raises
    :class:`SecAggError` with the reason when fewer than ``threshold`` clients are left.

    One client cannot stop a round: a sender whose ciphertexts have the wrong size is refused at the
    shares stage; a sender whose ciphertexts do not decrypt, so that fewer than ``threshold``
    survivors hold its shares, is dropped (its input is not summed; its pairwise masks come off with
    the survivors' mask keys with it); a wrong share in an unmask answer is found by rebuilding each
    secret from other subsets of ``threshold`` shares until it matches its commitment (self-mask seed)
    or public key (mask key), and its sender is named in ``wrong_shares``.
    """

    def __init__(self, round_num: int, participants: Iterable[int], threshold: int, bits: int, length: int):
        self.round = round_num
        self.participants = sorted(participants)
        if not 2 <= threshold <= len(self.participants):
            raise SecAggError(
                f"threshold {threshold} must lie in 2..{len(self.participants)} (the clients that take part)"
            )
        self.threshold = threshold
        self.bits = bits
        self.length = length
        self.keys: dict[int, _Advertised] = {}
        self.order: list[int] = []
        self._shares: dict[int, dict[int, bytes]] = {}
        """destination -> source -> ciphertext."""
        self.masked_with: list[int] = []
        self._masked: dict[int, np.ndarray] = {}
        self._unreadable: dict[int, set[int]] = {}
        """Client -> the senders whose shares it could not decrypt."""
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self.reveal: list[int] = []
        """Dropped clients whose secrets too few survivors hold: the survivors reveal their mask keys."""
        self._unmask: dict[int, tuple[dict[int, bytes], dict[int, bytes], dict[int, bytes]]] = {}
        self.wrong_shares: dict[int, list[int]] = {}
        """Client -> the owners of the secrets for which it sent a share that fits no rebuild."""

    # stage 0
    def add_keys(self, client_id: int, c_pk: bytes, s_pk: bytes, seed_hash: bytes) -> None:
        self._known(client_id, self.participants, "advertise keys")
        for name, value, size in (("c-pk", c_pk, 32), ("s-pk", s_pk, 32), ("seed-hash", seed_hash, 32)):
            if not isinstance(value, bytes) or len(value) != size:
                raise SecAggError(f"client {client_id}: {name} must be {size} bytes")
        self.keys[client_id] = _Advertised(c_pk, s_pk, seed_hash)

    def keys_done(self) -> dict[int, tuple[bytes, bytes]]:
        """U1's public keys (c_pk, s_pk) by client, to forward to each of them."""
        self.order = self._enough(self.keys, "advertised keys")
        return {cid: (self.keys[cid].c_pk, self.keys[cid].s_pk) for cid in self.order}

    # stage 1
    def add_shares(self, client_id: int, ciphertexts: Mapping[int, bytes]) -> None:
        self._known(client_id, self.order, "send shares")
        if set(ciphertexts) != set(self.order) - {client_id}:
            raise SecAggError(
                f"client {client_id} sent shares for {sorted(ciphertexts)}, expected one for each of "
                f"{sorted(set(self.order) - {client_id})}"
            )
        sizes = {dst: len(data) for dst, data in ciphertexts.items() if len(data) != CIPHERTEXT_BYTES}
        if sizes:
            raise SecAggError(
                f"client {client_id} sent ciphertexts of {sorted(set(sizes.values()))} bytes (for "
                f"{sorted(sizes)}); every encrypted pair of shares is {CIPHERTEXT_BYTES} bytes"
            )
        for dst, data in ciphertexts.items():
            self._shares.setdefault(dst, {})[client_id] = data
        self._shares.setdefault(client_id, {})

    def shares_done(self) -> list[int]:
        """U2: the clients whose shares every other member of U2 holds."""
        senders = {src for by_src in self._shares.values() for src in by_src}
        self.masked_with = self._enough(senders, "sent their shares")
        return self.masked_with

    def forwarded(self, client_id: int) -> dict[int, bytes]:
        """The ciphertexts for ``client_id`` from the other clients of U2."""
        return {
            src: ct for src, ct in sorted(self._shares.get(client_id, {}).items()) if src in self.masked_with
        }

    # stage 2
    def add_masked(self, client_id: int, masked: np.ndarray, unreadable: Iterable[int] = ()) -> None:
        """A client's masked input, and the senders whose shares it could not decrypt."""
        self._known(client_id, self.masked_with, "send a masked input")
        values = np.asarray(masked)
        if values.shape != (self.length,) or values.dtype.kind != "u":
            raise SecAggError(
                f"client {client_id}: a masked input is {self.length} unsigned integers, got "
                f"{values.dtype} of shape {values.shape}"
            )
        if self.bits < 64 and bool((values.astype(np.uint64) >> np.uint64(self.bits)).any()):
            raise SecAggError(
                f"client {client_id}: masked input values lie outside the ring of 2^{self.bits}"
            )
        unreadable = set(unreadable)
        if not unreadable <= set(self.masked_with) - {client_id}:
            raise SecAggError(
                f"client {client_id} names unreadable shares from {sorted(unreadable)}, not all other "
                "clients of this round"
            )
        self._masked[client_id] = values.astype(np.uint64)
        self._unreadable[client_id] = unreadable

    def drop(self, client_id: int) -> None:
        """Treat a client whose masked input arrived as dropped (its input is not summed)."""
        self._masked.pop(client_id, None)
        self._unreadable.pop(client_id, None)

    def masked_done(self) -> tuple[list[int], list[int]]:
        """(U3: the survivors whose masked inputs are summed, D: U2's clients that dropped).

        A client whose shares fewer than ``threshold`` survivors hold (the others could not read
        them) cannot be unmasked: it is dropped too, and named in ``reveal``, the clients whose
        pairwise masks come off with the survivors' mask keys with them."""
        survivors = set(self._enough(self._masked, "sent a masked input"))
        reveal: set[int] = set()
        while True:
            short = {
                v
                for v in self.masked_with
                if v not in reveal and len(self._holders(v, survivors)) < self.threshold
            }
            if not short:
                break
            reveal |= short
            survivors -= short
        self.survivors = self._enough(survivors, "sent a masked input others could unmask")
        self.dropped = sorted(set(self.masked_with) - set(self.survivors))
        self.reveal = sorted(reveal)
        return self.survivors, self.dropped

    def _holders(self, owner: int, survivors: set[int]) -> set[int]:
        """The survivors that hold shares of ``owner``'s secrets."""
        return {u for u in survivors if owner == u or owner not in self._unreadable.get(u, set())}

    # stage 3
    def add_unmask(
        self,
        client_id: int,
        seed_shares: Mapping[int, bytes],
        key_shares: Mapping[int, bytes],
        mask_keys: Mapping[int, bytes] | None = None,
    ) -> None:
        """A survivor's shares of the survivors' self-mask seeds and of the dropped clients' mask
        keys (those it holds), and its own mask keys with the clients of ``reveal``."""
        self._known(client_id, self.survivors, "send unmasking shares")
        mask_keys = dict(mask_keys or {})
        if not set(seed_shares) <= set(self.survivors) or not set(key_shares) <= set(self.dropped):
            raise SecAggError(
                f"client {client_id} sent seed shares for {sorted(seed_shares)} and key shares for "
                f"{sorted(key_shares)}, expected them for {self.survivors} and {self.dropped}"
            )
        if set(mask_keys) != set(self.reveal):
            raise SecAggError(
                f"client {client_id} revealed its mask keys with {sorted(mask_keys)}, expected {self.reveal}"
            )
        bad = [v for v, s in (*seed_shares.items(), *key_shares.items()) if len(s) != SHARE_BYTES]
        bad += [v for v, key in mask_keys.items() if len(key) != SECRET_BYTES]
        if bad:
            raise SecAggError(f"client {client_id}: shares or keys of {bad} are not {SHARE_BYTES} bytes")
        self._unmask[client_id] = (dict(seed_shares), dict(key_shares), mask_keys)

    def result(self) -> np.ndarray:
        """Σ_{u ∈ U3} x_u in the ring (uint64), once at least ``threshold`` survivors answered."""
        self._enough(self._unmask, "sent unmasking shares")
        total = np.zeros(self.length, dtype=np.uint64)
        for u in self.survivors:
            total = ring_add(total, self._masked[u], self.bits)
        for u in self.survivors:
            seed = self._rebuild(
                u, 0, "self-mask seed", lambda b, u=u: commitment(b) == self.keys[u].seed_hash
            )
            key = derive_key(seed, "self-mask", self.round, u, u)
            total = ring_sub(total, prg(key, self.length, self.bits), self.bits)
        for v in self.dropped:
            if v in self.reveal:
                keys = self._revealed(v)
            else:
                s_sk = self._rebuild(v, 1, "mask key", lambda k, v=v: public_key(k) == self.keys[v].s_pk)
                keys = {
                    u: derive_key(agree(s_sk, self.keys[u].s_pk), "mask", self.round, u, v)
                    for u in self.survivors
                }
            for u in self.survivors:
                pairwise = prg(keys[u], self.length, self.bits)
                # u added +PRG when u < v and −PRG when u > v: take that back
                total = (
                    ring_sub(total, pairwise, self.bits) if u < v else ring_add(total, pairwise, self.bits)
                )
        return total

    def _revealed(self, v: int) -> dict[int, bytes]:
        """Each survivor's mask key with the unreadable dropped client ``v``."""
        missing = [u for u in self.survivors if u not in self._unmask]
        if missing:
            raise SecAggError(
                f"client {v} sent shares nobody could read, so its masks come off with the survivors' mask "
                f"keys with it; survivors {missing} did not answer the unmask stage"
            )
        return {u: self._unmask[u][2][v] for u in self.survivors}

    def _rebuild(self, owner: int, which: int, what: str, valid: Callable[[bytes], bool]) -> bytes:
        """``owner``'s secret from ``threshold`` of the shares the responders sent, the first subset
        (in client order) whose result is ``valid``; shares that fit no valid rebuild name their
        senders in ``wrong_shares``."""
        holders = [w for w in sorted(self._unmask) if owner in self._unmask[w][which]]
        if len(holders) < self.threshold:
            raise SecAggError(
                f"round {self.round}: {len(holders)} clients sent shares of client {owner}'s {what}, fewer "
                f"than the threshold {self.threshold}"
            )
        for subset in itertools.islice(itertools.combinations(holders, self.threshold), MAX_SUBSETS):
            secret = self._combine(owner, which, subset)
            if secret is not None and valid(secret):
                for w in holders:
                    if w not in subset:
                        other = self._combine(owner, which, (*subset[1:], w))
                        if other is None or not valid(other):
                            self.wrong_shares.setdefault(w, []).append(owner)
                return secret
        raise SecAggError(
            f"round {self.round}: no {self.threshold} of the {len(holders)} shares of client {owner}'s "
            f"{what} rebuild it (too many wrong shares, or the client shared a wrong secret)"
        )

    def _combine(self, owner: int, which: int, responders: Sequence[int]) -> bytes | None:
        shares = {self.order.index(w): self._unmask[w][which][owner] for w in responders}
        try:
            return combine_secret(shares)
        except ValueError:
            return None

    def _known(self, client_id: int, allowed: Sequence[int], what: str) -> None:
        if client_id not in allowed:
            raise SecAggError(
                f"client {client_id} may not {what} in this stage (expected one of {list(allowed)})"
            )

    def _enough(self, present: Iterable[int], what: str) -> list[int]:
        clients = sorted(present)
        if len(clients) < self.threshold:
            raise SecAggError(
                f"round {self.round}: {len(clients)} clients {what}, fewer than the secure-aggregation "
                f"threshold {self.threshold}; the round's sum cannot be formed safely"
            )
        return clients
