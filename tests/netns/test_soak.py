"""Two minutes of the soak (bench/soak.py; ``make soak`` runs ten): no leak, no stale route, no death."""

from __future__ import annotations

import pytest

from bench.soak import slope_per_minute, soak, table

pytestmark = [pytest.mark.root, pytest.mark.etcd]

# Generous: a leak of one fd, one thread or 1 MiB a minute would still be caught within hours,
# and a real leak under this churn (a socket per reconnect, a task per event) is far steeper.
RSS_KIB_PER_MIN = 1024
FDS_PER_MIN = 1.0
THREADS_PER_MIN = 1.0


def test_slope_per_minute() -> None:
    assert slope_per_minute([(0, 5), (60, 5), (120, 5)]) == 0
    assert slope_per_minute([(0, 0), (30, 1), (60, 2)]) == pytest.approx(2)
    assert slope_per_minute([(0, 7)]) == 0


def test_two_minutes_of_churn_leave_no_leak_no_stale_route_no_death() -> None:
    result = soak(120, period=4)
    print(table(result))
    assert result["deaths"] == []
    assert result["stale_routes"] == {}
    assert sum(result["actions"].values()) >= 120 / 4 - 2, result["actions"]
    assert result["pings_sent"] >= 1000 and result["pings_lost"] == 0, result
    for name, s in result["slopes"].items():
        assert s["rss_kib_per_min"] < RSS_KIB_PER_MIN, (name, s)
        assert s["fds_per_min"] < FDS_PER_MIN, (name, s)
        assert s["threads_per_min"] < THREADS_PER_MIN, (name, s)
