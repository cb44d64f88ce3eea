"""Secure aggregation's core: quantisation on the ring, pairwise and self masks agreed by X25519,
Shamir-shared seeds, and the server's unmasking with dropped clients."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import pytest

from fedprompt.federation.secagg import ClientSession, SecAggError, ServerSession
from fedprompt.federation.secagg_primitives import RingQuantizer, combine_secret, split_secret

ROUND = 4


def run_round(
    inputs: dict[int, np.ndarray],
    threshold: int,
    bits: int,
    stops: dict[int, str] | None = None,
    garbage: Iterable[int] = (),
    wrong: Iterable[int] = (),
) -> tuple[ServerSession, dict[int, np.ndarray]]:
    """One secure round among ``inputs``' clients (ring elements by client id). ``stops[c]`` is the
    stage client c no longer answers ("keys", "shares", "masked" or "unmask"); the clients in
    ``garbage`` send random bytes (of the right size) for their encrypted shares; those in ``wrong``
    send a wrong share of every self-mask seed when unmasking. Returns the server's session after
    the unmask stage (call ``result()``) and the masked inputs it received."""
    stops = stops or {}
    ids = sorted(inputs)
    length = len(next(iter(inputs.values())))
    server = ServerSession(ROUND, ids, threshold, bits, length)
    sessions: dict[int, ClientSession] = {}
    for cid in ids:
        session, advert = ClientSession.start(cid, ROUND, ids, threshold)
        if stops.get(cid) != "keys":
            sessions[cid] = session
            server.add_keys(cid, advert["c-pk"], advert["s-pk"], advert["seed-hash"])
    keys = server.keys_done()
    for cid in keys:
        ciphertexts = sessions[cid].share(keys)
        if cid in garbage:
            ciphertexts = {dst: os.urandom(len(ct)) for dst, ct in ciphertexts.items()}
        if stops.get(cid) != "shares":
            server.add_shares(cid, ciphertexts)
    masked_with = server.shares_done()
    masked = {}
    for cid in masked_with:
        y = sessions[cid].mask(server.forwarded(cid), inputs[cid], bits)
        if stops.get(cid) != "masked":
            masked[cid] = y
            server.add_masked(cid, y, sessions[cid].unreadable)
    survivors, dropped = server.masked_done()
    for cid in survivors:
        seed_shares, key_shares, mask_keys = sessions[cid].unmask(survivors, dropped, server.reveal)
        if cid in wrong:
            seed_shares = {v: os.urandom(len(share)) for v, share in seed_shares.items()}
        if stops.get(cid) != "unmask":
            server.add_unmask(cid, seed_shares, key_shares, mask_keys)
    return server, masked


def ring_inputs(count: int, length: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {3 * cid + 1: rng.integers(0, 2**bits, size=length, dtype=np.uint64) for cid in range(count)}


def plain_sum(inputs: dict[int, np.ndarray], clients: list[int], bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for cid in clients:
        total = (total + inputs[cid]) & np.uint64(2**bits - 1)
    return total


def test_quantisation_by_hand():
    # c = 1, 8 bits, 2 clients: L = floor(127 / 2) = 63 levels each side, scale 63.
    quantizer = RingQuantizer(clip_range=1.0, bits=8, num_clients=2)
    assert (quantizer.levels, quantizer.scale) == (63, 63.0)
    ring, clipped = quantizer.quantize(np.array([0.5, -2.0, 0.01, -0.25]), weight=1.0)
    # 31.5 rounds to even (32), -2 clips to -63 (= 256 - 63 = 193 on the ring), 0.63 -> 1, -15.75 -> -16
    assert ring.tolist() == [32, 193, 1, 240] and clipped == 1
    half, _ = quantizer.quantize(np.array([0.5, -1.0]), weight=0.5)
    assert quantizer.decode(half).tolist() == [16, -32]  # 15.75 -> 16, -31.5 -> -32 (even)
    total = (ring[:2] + half) & np.uint64(255)
    assert quantizer.decode(total).tolist() == [48, -95]
    # the weighted mean (0.5 * 1 + 0.5 * 0.5) / 1.5 of the first coordinate, within 2 / (2 * 63 * 1.5)
    mean = quantizer.mean(total, total_weight=1.5)
    assert mean[0] == pytest.approx(48 / 94.5) and abs(mean[0] - 0.75 / 1.5) <= quantizer.max_error(2, 1.5)
    with pytest.raises(ValueError, match="weight lies in"):
        quantizer.quantize(np.array([0.1]), weight=1.5)
    with pytest.raises(ValueError, match="no quantisation levels"):
        RingQuantizer(clip_range=1.0, bits=4, num_clients=10)


@pytest.mark.parametrize("bits", [16, 32, 48])
def test_the_mean_from_the_ring_sum_is_within_the_stated_error(bits):
    rng = np.random.default_rng(bits)
    n = 7
    quantizer = RingQuantizer(clip_range=0.5, bits=bits, num_clients=n)
    deltas = [rng.normal(0, 0.1, size=500) for _ in range(n)]
    weights = rng.uniform(0.1, 1.0, size=n)
    total = np.zeros(500, dtype=np.uint64)
    for delta, weight in zip(deltas, weights, strict=True):
        ring, _ = quantizer.quantize(delta, float(weight))
        total = (total + ring) & quantizer.modulus_mask
    exact = sum(w * np.clip(d, -0.5, 0.5) for d, w in zip(deltas, weights, strict=True)) / weights.sum()
    error = np.abs(quantizer.mean(total, float(weights.sum())) - exact).max()
    assert error <= quantizer.max_error(n, float(weights.sum()))
    assert error > 0  # quantisation is not free


def test_shamir_shares_rebuild_the_secret_from_any_threshold_of_them():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert combine_secret({0: shares[0], 2: shares[2], 4: shares[4]}) == secret
    assert combine_secret({1: shares[1], 3: shares[3], 4: shares[4]}) == secret
    assert combine_secret({0: shares[0], 1: shares[1]}) != secret  # two are not enough


def test_the_masked_sum_is_the_plain_sum_exactly_on_the_ring():
    inputs = ring_inputs(5, 1000, bits=32)
    server, masked = run_round(inputs, threshold=3, bits=32)
    assert np.array_equal(server.result(), plain_sum(inputs, sorted(inputs), 32))
    assert all(not np.array_equal(masked[c], inputs[c]) for c in inputs)


def test_a_single_masked_input_looks_uniform_and_uncorrelated_with_the_update():
    # A structured update (a ramp over the whole quantisation range) is masked by two others'
    # pairwise masks and its self mask: what the server sees is uniform on the ring and carries no
    # trace of the update. (Bounds of > 8 standard deviations: the test cannot fail by chance.)
    length = 20_000
    quantizer = RingQuantizer(clip_range=1.0, bits=32, num_clients=3)
    update, _ = quantizer.quantize(np.linspace(-1, 1, length), weight=1.0)
    inputs = {1: update, **{c: np.zeros(length, dtype=np.uint64) for c in (2, 3)}}
    _, masked = run_round(inputs, threshold=2, bits=32)
    seen = masked[1].astype(np.float64) / 2**32
    signal = quantizer.decode(update).astype(np.float64)
    assert abs(np.corrcoef(seen, signal)[0, 1]) < 0.06
    counts = np.bincount((masked[1] >> np.uint64(28)).astype(np.int64), minlength=16)
    chi_square = float((((counts - length / 16) ** 2) / (length / 16)).sum())
    assert chi_square < 100  # 15 degrees of freedom: P(chi2 > 100) < 1e-13
    assert masked[1].max() < 2**32


@pytest.mark.parametrize(
    "stops",
    [
        {7: "unmask"},  # sent its masked input, then dropped: its self mask comes off with others' shares
        {4: "masked", 13: "unmask"},  # one never sent its input, one dropped after sending it
        {1: "masked", 4: "masked"},  # two never sent their inputs: their pairwise masks come off
        {10: "shares"},  # dropped before its shares went out: nobody masked with it
    ],
)
def test_dropped_clients_leave_the_exact_sum_of_the_survivors(stops):
    inputs = ring_inputs(5, 300, bits=20, seed=len(stops))
    server, masked = run_round(inputs, threshold=3, bits=20, stops=stops)
    summed = sorted(masked)
    assert summed == [c for c in inputs if stops.get(c) not in ("masked", "shares")]
    assert np.array_equal(server.result(), plain_sum(inputs, summed, 20))


def test_below_the_threshold_the_round_fails_with_its_reason():
    inputs = ring_inputs(5, 10, bits=16)
    with pytest.raises(
        SecAggError, match="2 clients sent a masked input, fewer than the secure-aggregation threshold 3"
    ):
        run_round(inputs, threshold=3, bits=16, stops={1: "masked", 4: "masked", 7: "masked"})
    server, _ = run_round(inputs, threshold=3, bits=16, stops={1: "unmask", 4: "unmask", 7: "unmask"})
    with pytest.raises(SecAggError, match="2 clients sent unmasking shares, fewer than"):
        server.result()


def test_a_client_refuses_to_reveal_both_seeds_of_one_client_or_unmask_too_few():
    inputs = ring_inputs(3, 8, bits=16)
    ids = sorted(inputs)
    sessions = {}
    server = ServerSession(ROUND, ids, 2, 16, 8)
    for cid in ids:
        sessions[cid], advert = ClientSession.start(cid, ROUND, ids, 2)
        server.add_keys(cid, advert["c-pk"], advert["s-pk"], advert["seed-hash"])
    keys = server.keys_done()
    for cid in ids:
        server.add_shares(cid, sessions[cid].share(keys))
    server.shares_done()
    for cid in ids:
        sessions[cid].mask(server.forwarded(cid), inputs[cid], 16)
    a, b, c = ids
    saved = sessions[a].to_record()  # each attempt below on the session as it was after masking
    with pytest.raises(SecAggError, match="do not split the clients"):
        ClientSession.from_record(saved).unmask([a, b, c], [c])  # c alive and dropped: both secrets
    with pytest.raises(SecAggError, match="do not split"):
        ClientSession.from_record(saved).unmask([a, b], [])  # c missing from both lists
    with pytest.raises(SecAggError, match="1 clients survived, fewer than the threshold 2"):
        sessions[a].unmask([a], [b, c])
    with pytest.raises(SecAggError, match="stage 'unmask' arrived after stage 'unmask'"):
        sessions[a].unmask([a, b, c], [])  # one unmask per round, even after a refusal
    with pytest.raises(SecAggError, match=rf"mask keys with \[{c}\], which did not drop"):
        ClientSession.from_record(saved).unmask([a, b, c], [], reveal=[c])
    seed_shares, key_shares, mask_keys = ClientSession.from_record(saved).unmask([a, c], [b])
    assert sorted(seed_shares) == [a, c] and sorted(key_shares) == [b] and mask_keys == {}


def test_out_of_order_stages_and_tampered_shares_are_refused():
    ids = [1, 2, 3]
    sessions = {cid: ClientSession.start(cid, ROUND, ids, 2) for cid in ids}
    keys = {cid: (advert["c-pk"], advert["s-pk"]) for cid, (_, advert) in sessions.items()}
    with pytest.raises(SecAggError, match="stage 'masked' arrived after stage 'keys'"):
        sessions[1][0].mask({}, np.zeros(4, dtype=np.uint64), 16)
    forged = dict(keys)
    forged[2] = keys[3]
    with pytest.raises(SecAggError, match="other public keys for this client"):
        sessions[2][0].share(forged)
    to_two = sessions[1][0].share(keys)[2]
    sessions[2] = ClientSession.start(2, ROUND, ids, 2)  # a fresh session for client 2
    other_keys = {**keys, 2: (sessions[2][1]["c-pk"], sessions[2][1]["s-pk"])}
    sessions[2][0].share(other_keys)
    # a tampered ciphertext is the sender's problem: the receiver masks on and names it
    sessions[2][0].mask({1: to_two[:-1] + bytes([to_two[-1] ^ 1])}, np.zeros(4, dtype=np.uint64), 16)
    assert sessions[2][0].unreadable == (1,) and 1 not in sessions[2][0].held_b


def test_the_server_checks_what_clients_send():
    server = ServerSession(ROUND, [1, 2, 3], 2, 16, 4)
    with pytest.raises(SecAggError, match="client 9 may not advertise keys"):
        server.add_keys(9, bytes(32), bytes(32), bytes(32))
    with pytest.raises(SecAggError, match="c-pk must be 32 bytes"):
        server.add_keys(1, b"short", bytes(32), bytes(32))
    with pytest.raises(SecAggError, match=r"threshold 1 must lie in 2\.\.3"):
        ServerSession(ROUND, [1, 2, 3], 1, 16, 4)
    server.masked_with = [1, 2, 3]
    with pytest.raises(SecAggError, match=r"outside the ring of 2\^16"):
        server.add_masked(1, np.array([1, 2, 3, 2**16], dtype=np.uint64))
    with pytest.raises(SecAggError, match="4 unsigned integers, got int64"):
        server.add_masked(2, np.array([1, 2, 3, 4], dtype=np.int64))


# --------------------------------------------------------------------------- one client cannot stop a round


def test_a_sender_of_unreadable_shares_is_dropped_and_the_others_are_summed_exactly():
    # Today the first honest receiver raised on the garbage ciphertext and the round stopped.
    inputs = ring_inputs(10, 200, bits=24, seed=3)
    bad = sorted(inputs)[4]
    server, masked = run_round(inputs, threshold=6, bits=24, garbage=[bad])
    assert bad in masked  # it even sent a masked input: that input is not summed
    assert server.reveal == [bad] and bad in server.dropped
    others = [c for c in sorted(inputs) if c != bad]
    assert server.survivors == others
    assert np.array_equal(server.result(), plain_sum(inputs, others, 24))


def test_unreadable_shares_of_a_client_that_also_dropped_are_handled_the_same_way():
    inputs = ring_inputs(6, 50, bits=20, seed=5)
    ids = sorted(inputs)
    server, _ = run_round(inputs, threshold=4, bits=20, garbage=[ids[0]], stops={ids[0]: "masked"})
    assert np.array_equal(server.result(), plain_sum(inputs, ids[1:], 20))


def test_a_wrong_unmask_share_is_identified_and_another_subset_rebuilds_the_secrets():
    inputs = ring_inputs(7, 64, bits=20, seed=9)
    ids = sorted(inputs)
    liar = ids[1]  # among the first `threshold` responders, whose shares were the only ones used
    server, _ = run_round(inputs, threshold=4, bits=20, wrong=[liar])
    assert np.array_equal(server.result(), plain_sum(inputs, ids, 20))
    assert sorted(server.wrong_shares) == [liar] and sorted(server.wrong_shares[liar]) == ids


def test_too_many_wrong_shares_fail_the_round_with_the_owner_named():
    inputs = ring_inputs(4, 8, bits=16, seed=1)
    ids = sorted(inputs)
    server, _ = run_round(inputs, threshold=3, bits=16, wrong=ids[:2])
    with pytest.raises(SecAggError, match=rf"no 3 of the 4 shares of client {ids[0]}'s self-mask seed"):
        server.result()


def test_ciphertexts_of_the_wrong_size_drop_their_sender_at_the_shares_stage():
    ids = [1, 2, 3]
    server = ServerSession(ROUND, ids, 2, 16, 4)
    sessions = {}
    for cid in ids:
        sessions[cid], advert = ClientSession.start(cid, ROUND, ids, 2)
        server.add_keys(cid, advert["c-pk"], advert["s-pk"], advert["seed-hash"])
    keys = server.keys_done()
    short = {dst: ct[:40] for dst, ct in sessions[1].share(keys).items()}
    with pytest.raises(
        SecAggError, match=r"client 1 sent ciphertexts of \[40\] bytes .* every encrypted pair"
    ):
        server.add_shares(1, short)
    for cid in (2, 3):
        server.add_shares(cid, sessions[cid].share(keys))
    assert server.shares_done() == [2, 3]
    # and a receiver given a short ciphertext names its sender instead of raising
    sessions[2].mask({3: b"\x00" * 7}, np.zeros(4, dtype=np.uint64), 16)
    assert sessions[2].unreadable == (3,)


def test_a_site_pins_the_fewest_clients_it_masks_and_unmasks_with():
    with pytest.raises(SecAggError, match="3 participants, fewer than the 4 this client requires"):
        ClientSession.start(1, ROUND, [1, 2, 3], 2, min_survivors=4)
    inputs = ring_inputs(4, 8, bits=16)
    ids = sorted(inputs)
    server = ServerSession(ROUND, ids, 2, 16, 8)
    sessions = {}
    for cid in ids:
        sessions[cid], advert = ClientSession.start(cid, ROUND, ids, 2, min_survivors=4)
        server.add_keys(cid, advert["c-pk"], advert["s-pk"], advert["seed-hash"])
    keys = server.keys_done()
    for cid in ids:
        server.add_shares(cid, sessions[cid].share(keys))
    server.shares_done()
    for cid in ids:
        sessions[cid].mask(server.forwarded(cid), inputs[cid], 16)
    with pytest.raises(
        SecAggError, match=r"3 clients survived, fewer than the threshold 2 \(this site requires 4\)"
    ):
        sessions[ids[0]].unmask(ids[:3], ids[3:])
