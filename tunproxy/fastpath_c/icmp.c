/*
 * The ICMP errors the fast path answers with (RFC 792), when RFC 1812 allows
 * one, at most icmp_rate a second in bursts of icmp_burst.
 */
#include "internal.h"

/* RFC 1812 4.3.2.7: no ICMP error about an ICMP error, a non-first fragment,
 * or a packet from/to a multicast, broadcast or unspecified address. */
static int icmp_due(const uint8_t *p, uint32_t tot)
{
    uint32_t ihl = (p[0] & 15) * 4u, src = get32(p + 12), dst = get32(p + 16);
    if ((get16(p + 6) & 0x1fff) || src == 0 || src >= 0xe0000000u || dst >= 0xe0000000u)
        return 0;
    if (p[9] == 1) {
        if (tot <= ihl)
            return 0;
        switch (p[ihl]) {
        case 3: case 4: case 5: case 11: case 12:
            return 0;
        }
    }
    return 1;
}

static int take_token(struct fp_ctx *c, uint64_t now)
{
    if (now > c->last_ms) {
        uint64_t elapsed = now - c->last_ms, cap = (uint64_t)c->icmp_burst * 1000;
        if (elapsed > 1000000000u)
            elapsed = 1000000000u;
        c->tokens += elapsed * c->icmp_rate;
        if (c->tokens > cap)
            c->tokens = cap;
        c->last_ms = now;
    }
    if (c->tokens < 1000) {
        c->cnt.icmp_ratelimited++;
        return 0;
    }
    c->tokens -= 1000;
    return 1;
}

/* Build in c->scratch the ICMP error about packet p (RFC 792: quote its header
 * and 8 bytes of data); returns its length, or 0 if none is due. */
uint32_t icmp_error(struct fp_ctx *c, const uint8_t *p, uint32_t tot,
                    uint8_t type, uint8_t code, uint32_t mtu, uint64_t now)
{
    if (!icmp_due(p, tot) || !take_token(c, now))
        return 0;
    uint8_t *o = c->scratch;
    uint32_t quote = (p[0] & 15) * 4u + 8;
    if (quote > tot)
        quote = tot;
    uint32_t len = 28 + quote;
    memset(o, 0, 28);
    o[0] = 0x45;
    put16(o + 2, len);
    o[8] = 64;
    o[9] = 1;
    put32(o + 12, c->local_addr);
    memcpy(o + 16, p + 12, 4);
    put16(o + 10, csum(o, 20));
    o[20] = type;
    o[21] = code;
    put16(o + 26, mtu);
    memcpy(o + 28, p, quote);
    put16(o + 22, csum(o + 20, 8 + quote));
    return len;
}

void icmp_to_tun(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot,
                 uint8_t type, uint8_t code, uint32_t mtu, uint64_t now)
{
    uint32_t len = icmp_error(c, p, tot, type, code, mtu, now);
    if (len && tun_write(c, tun_fd, c->scratch, len) == (ssize_t)len)
        c->cnt.icmp_sent++;
}
