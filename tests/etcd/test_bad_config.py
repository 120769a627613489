"""Bad values in the network config in etcd: one log line naming the field, and a wait for a fix.

A config in etcd is shared by every host and fixed by the operator while the
hosts wait, so it is a run-time value: not an exit, one line (not one per
retry), and the daemon proceeds as soon as a usable config is written.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from .test_registry import LOGGER, messages, put_config, registry, run, wait_for_log

pytestmark = pytest.mark.etcd


@pytest.mark.parametrize(
    "doc, says",
    [
        ({"Network": "10.100.0.0/16", "Backend": {"Type": "udp", "Port": "8285"}}, "Backend.Port must be"),
        ({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "MTU": 100}}, "Backend.MTU must be"),
        ({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "GBP": "on"}}, "Backend.GBP must be"),
        ({"Network": "10.100.0.0/16", "Backend": {"Type": "wireguard"}}, "Backend.Type 'wireguard'"),
        ({"Network": "10.100.0.0/16", "EnableIPv4": False}, "EnableIPv4 is false"),
        ({"Network": "10.100.0.0/16", "SubnetMin": "10.100.0.7"}, "SubnetMin 10.100.0.7 is not on a /24"),
    ],
)
def test_a_bad_config_value_is_one_line_then_a_fix_is_taken(etcd, caplog, doc, says):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd, doc)
        reg = registry(etcd.endpoint)
        task = asyncio.create_task(reg.network_config())
        await wait_for_log(caplog, says)
        assert not task.done()
        await put_config(etcd, {"Network": "10.9.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1400}})
        config = await asyncio.wait_for(task, 8)
        got = (str(config.network), config.backend_type, config.backend.mtu)
        assert got == ("10.9.0.0/16", "vxlan", 1400)
        await reg.close()

    run(main())
    lines = messages(caplog, says)
    assert len(lines) == 1
    assert lines[0].startswith("network config at /coreos.com/network/config is unusable: ")
