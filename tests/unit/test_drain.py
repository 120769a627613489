"""The udp backend's drain rule: how many passes over both directions one wake-up makes."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from tunproxy.backends.udp import (
    MAX_PASSES,
    REPLY_MISSES,
    REPLY_PROBE,
    UdpBackend,
    drain_again,
    next_misses,
    read_replies,
)

BATCH = 64


def test_a_full_batch_either_way_means_another_pass():
    assert drain_again(BATCH, 0, BATCH, 1)
    assert drain_again(0, BATCH, BATCH, 1)


def test_short_batches_both_ways_end_the_wake_up():
    assert not drain_again(BATCH - 1, BATCH - 1, BATCH, 1)
    assert not drain_again(0, 0, BATCH, 1)


def test_never_past_the_bound_however_busy():
    assert drain_again(BATCH, BATCH, BATCH, MAX_PASSES - 1)
    assert not drain_again(BATCH, BATCH, BATCH, MAX_PASSES)


@given(st.integers(0, 1024), st.integers(0, 1024), st.integers(1, 1024), st.integers(1, 100))
def test_rule(tx, rx, batch, passes):
    assert drain_again(tx, rx, batch, passes) == (passes < MAX_PASSES and max(tx, rx) >= batch)


def _drain(tx_counts, rx_counts, first_tx, first_rx):
    """Run the backend's drain loop against scripted batch sizes; the calls it made, per direction."""
    calls = {"tx": 0, "rx": 0}
    tx_iter, rx_iter = iter(tx_counts), iter(rx_counts)

    def tun_to_udp(fp, tun_fd, udp_fd, now):
        calls["tx"] += 1
        return next(tx_iter, 0)

    def udp_to_tun(fp, udp_fd, tun_fd, now):
        calls["rx"] += 1
        return next(rx_iter, 0)

    fake = SimpleNamespace(batch=BATCH, _tun_to_udp=tun_to_udp, _udp_to_tun=udp_to_tun)
    UdpBackend._drain_both(fake, None, 3, 4, 0, first_tx, first_rx)  # type: ignore[arg-type]
    return calls


def test_a_flood_that_never_ends_gets_at_most_the_bound():
    calls = _drain([BATCH] * 1000, [], BATCH, 0)
    assert calls == {"tx": MAX_PASSES - 1, "rx": MAX_PASSES - 1}


def test_the_loop_stops_once_both_directions_come_back_short():
    calls = _drain([BATCH, BATCH, 3], [0, BATCH, 0], BATCH, 0)
    assert calls == {"tx": 3, "rx": 3}


def test_a_short_first_pass_makes_no_more():
    assert _drain([BATCH], [BATCH], 5, 1) == {"tx": 0, "rx": 0}


# --- reading the TUN for replies straight after writing to it ------------------------------------


def _reads(found_pattern, wakeups):
    """Which of ``wakeups`` read the TUN, when a read finds a reply iff found_pattern(i)."""
    misses, reads = 0, []
    for i in range(wakeups):
        read = read_replies(misses)
        if read:
            reads.append(i)
        misses = next_misses(misses, read and found_pattern(i))
    return reads


def test_replies_the_kernel_makes_keep_the_read_on():
    assert _reads(lambda i: True, 1000) == list(range(1000))


def test_an_application_peer_turns_it_to_one_probe_in_reply_probe():
    reads = _reads(lambda i: False, REPLY_MISSES + 3 * REPLY_PROBE)
    assert reads[:REPLY_MISSES] == list(range(REPLY_MISSES))
    probes = reads[REPLY_MISSES:]
    assert len(probes) == 3
    assert [b - a for a, b in zip(probes, probes[1:], strict=False)] == [REPLY_PROBE, REPLY_PROBE]


def test_a_probe_that_finds_replies_turns_it_back_on():
    first_probe = REPLY_MISSES + REPLY_PROBE - 1
    reads = _reads(lambda i: i >= first_probe, first_probe + 10)
    assert reads[-10:] == list(range(first_probe, first_probe + 10))


@given(st.lists(st.booleans(), max_size=500))
def test_misses_stay_small(found):
    misses = 0
    for hit in found:
        misses = next_misses(misses, hit)
        assert 0 <= misses < REPLY_MISSES + REPLY_PROBE
