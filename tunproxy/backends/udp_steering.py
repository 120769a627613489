"""Flow steering for ``--workers N``: the classic BPF program that picks a worker by the inner flow.

Which worker sees a packet is the kernel's choice: the TUN picks a queue per
flow (its flow table sends a flow's packets to the queue that last wrote the
flow's other direction), and the socket group picks a socket per datagram.
Between two hosts every datagram has the same outer addresses and ports, so
the group's own hash would hand them all to one worker, and through the
TUN's flow table every flow would follow. A classic BPF program on the group
(SO_ATTACH_REUSEPORT_CBPF) picks the socket by a symmetric hash of the
*inner* addresses and ports instead (``flow_steering_program``, attached by
``udp_devices.attach_flow_steering``), so a flow and its replies stay on one
worker on both hosts, and different flows spread. The wire format does not
change.

Pure: instructions as tuples; the unit tests run them through a small interpreter.
"""

from __future__ import annotations

# Classic BPF (linux/filter.h, linux/bpf_common.h): (code, jt, jf, k).
_LD_W_ABS, _LD_B_ABS, _LD_W_IND, _LD_MEM = 0x20, 0x30, 0x40, 0x60
_LDX_MEM, _LDX_B_MSH, _ST = 0x61, 0xB1, 0x02
_XOR_X, _RSH_K, _AND_K, _MUL_K, _MOD_K = 0xAC, 0x74, 0x54, 0x24, 0x94
_JEQ_K, _JA, _TAX, _RET_A = 0x15, 0x05, 0x07, 0x16
Insn = tuple[int, int, int, int]


def flow_steering_program(workers: int) -> list[Insn]:
    """The classic BPF program that hands a datagram to worker ``hash(inner flow) % workers``.

    The kernel runs it on a datagram for the SO_REUSEPORT group with the
    data starting after the UDP header (net/core/sock_reuseport.c
    run_bpf_filter), so offset 0 is the inner IPv4 header; the value
    returned is the socket's index in the group (an index past the end
    falls back to the kernel's hash). The hash folds the inner source and
    destination addresses, and for TCP and UDP the port pair, with XOR and
    then its two 16-bit halves together, so a packet and its reply (source
    and destination swapped) get the same worker on either host.
    """
    if not 1 <= workers <= 0xFFFF:
        raise ValueError(f"workers must be in 1..65535, got {workers}")
    return [
        (_LD_W_ABS, 0, 0, 12),  # 0: A = inner source
        (_ST, 0, 0, 0),  # 1: M[0] = A
        (_LD_W_ABS, 0, 0, 16),  # 2: A = inner destination
        (_LDX_MEM, 0, 0, 0),  # 3: X = M[0]
        (_XOR_X, 0, 0, 0),  # 4: A ^= X
        (_ST, 0, 0, 0),  # 5: M[0] = A
        (_LD_B_ABS, 0, 0, 9),  # 6: A = protocol
        (_JEQ_K, 1, 0, 6),  # 7: TCP -> 9
        (_JEQ_K, 0, 5, 17),  # 8: UDP -> 9, else -> 14
        (_LDX_B_MSH, 0, 0, 0),  # 9: X = 4 * IHL
        (_LD_W_IND, 0, 0, 0),  # 10: A = source port << 16 | destination port
        (_LDX_MEM, 0, 0, 0),  # 11: X = M[0]
        (_XOR_X, 0, 0, 0),  # 12: A ^= X
        (_ST, 0, 0, 0),  # 13: M[0] = A
        (_LD_MEM, 0, 0, 0),  # 14: A = M[0]
        (_TAX, 0, 0, 0),  # 15: X = A
        (_RSH_K, 0, 0, 16),  # 16: A >>= 16
        (_XOR_X, 0, 0, 0),  # 17: A ^= X
        (_AND_K, 0, 0, 0xFFFF),  # 18: the low half is symmetric in source and destination
        (_MUL_K, 0, 0, 0x9E3779B1),  # 19: mixed (Knuth's multiplicative hash): ports differ in
        (_RSH_K, 0, 0, 16),  # 20: their high bits mostly (Linux picks even ephemeral ports)
        (_MOD_K, 0, 0, workers),  # 21
        (_RET_A, 0, 0, 0),  # 22
    ]


__all__ = ["Insn", "flow_steering_program"]
