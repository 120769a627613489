"""The udp backend's drain rule: when to read the TUN for replies straight after writing to it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunproxy.backends.udp import REPLY_MISSES, REPLY_PROBE, next_misses, read_replies


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
