/*
 * Checksums and the IPv4 header checks every packet passes: the one's
 * complement sum (RFC 1071), completing a partial checksum, a header's
 * soundness, the TTL decrement.
 */
#include "internal.h"

/* The one's complement sum (RFC 1071) of p[0..n) as big-endian 16-bit words,
 * plus sum, folded to 16 bits, not complemented.  Offload mode sums every byte
 * that passes, so this adds native 32-bit halves of 64-bit words into four
 * 64-bit accumulators (no carries lost below 2^32 words) and swaps bytes once
 * at the end: RFC 1071 2(B), the sum does not care about byte order. */
uint32_t sum16(const uint8_t *p, size_t n, uint32_t sum)
{
    uint64_t s = 0, a[4] = {0, 0, 0, 0}, d;
    uint16_t h;
    for (; n >= 32; p += 32, n -= 32) {
        for (int i = 0; i < 4; i++) {
            memcpy(&d, p + 8 * i, 8);
            a[i] += (d & 0xffffffffu) + (d >> 32);
        }
    }
    s = a[0] + a[1] + a[2] + a[3];
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&d, p, 8);
        s += (d & 0xffffffffu) + (d >> 32);
    }
    for (; n >= 2; p += 2, n -= 2) {
        memcpy(&h, p, 2);
        s += h;
    }
    if (n) {
        uint8_t last[2] = {p[0], 0};
        memcpy(&h, last, 2);
        s += h;
    }
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    s = ntohs((uint16_t)s) + (uint64_t)sum;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

/* Complete a partial checksum as the kernel's skb_checksum_help does: the
 * field at start + off holds the pseudo-header sum, so sum [start, len) over
 * it.  0 goes out as 0xFFFF, the same number, and the only one UDP allows. */
void csum_finish(uint8_t *p, uint32_t len, uint32_t start, uint32_t off)
{
    uint32_t s = ~sum16(p + start, len - start, 0) & 0xffff;
    put16(p + start + off, s ? s : 0xffff);
}

/* The packet's total length if it is a sound IPv4 packet of n bytes, else 0.
 * Trailing bytes past the total length are ignored (and later not sent). */
uint32_t ip_valid(const uint8_t *p, size_t n)
{
    if (n < 20 || p[0] >> 4 != 4)
        return 0;
    uint32_t ihl = (p[0] & 15) * 4u, tot = get16(p + 2);
    if (ihl < 20 || ihl > n || tot < ihl || tot > n || csum(p, ihl) != 0)
        return 0;
    return tot;
}

/* TTL - 1, checksum patched per RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'). */
void ttl_dec(uint8_t *p)
{
    uint32_t m = get16(p + 8);
    p[8]--;
    uint32_t s = (~get16(p + 10) & 0xffff) + (~m & 0xffff) + get16(p + 8);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    put16(p + 10, ~s);
}
