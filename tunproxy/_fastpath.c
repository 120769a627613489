/*
 * How it works
 *
 * The udp backend carries whole IPv4 packets between a TUN device and a UDP
 * socket.  Python is too slow to touch every packet, so when an fd is readable
 * it makes one call here and the call does a whole batch: up to `batch` read()s
 * from the TUN and one sendmmsg(), or one recvmmsg() and up to `batch`
 * write()s.  Per packet we only validate the header, look up the route,
 * decrement the TTL with the RFC 1624 incremental checksum (no full recompute)
 * and maybe answer with an ICMP error.  Everything else - which routes exist,
 * what to do with an error, when to log - is Python's business.
 *
 * Memory is all the caller's (see _fastpath.h): the ring of slots, the
 * mmsghdr/iovec/sockaddr arrays that point into it, the route and peer
 * tables (and their spares, for growing and whole replacements), the drop ring.  So nothing is allocated per packet and nothing can
 * leak; an error is just a -errno return value.
 *
 * Route lookup: the table is an open-addressing hash of (prefix, len), at
 * most half full, plus a 33-bit mask of the prefix lengths present.  A lookup
 * walks the present lengths from longest to shortest and probes once for
 * (dst & mask, len): usually one or two probes, whatever the table size.  A
 * batch of changes (fp_update_routes) is checked whole before anything moves,
 * so an error leaves the table as it was, and costs the size of the batch,
 * not of the table: 2,000 leases revoked at once are one call.  fp_set_routes
 * builds a new table aside (the "alt" arrays) and swaps it in.  Everything
 * runs on one thread, so a packet sees the table before a call or after it.
 *
 * Peers (the set of next hops) live in an open-addressing hash table at most
 * a quarter full, so the receive path can reject an unknown source in O(1).
 * Each peer counts the routes pointing at it and goes with the last one; a
 * peer that keeps any route keeps its counters through every change.
 * A known peer is not trusted with any source address: the inner source of
 * its packet must route back to it (see rx_packet), or it is dropped as spoofed.
 *
 * Time comes in as now_ms, so the ICMP token bucket is deterministic in tests.
 *
 * Offload mode
 *
 * Batching alone leaves a system call per packet on the TUN side, and that
 * caps a userspace tunnel near 2.5 Gbit/s in any language (REFERENCE.md).
 * The kernel can hand over bigger units, so in offload mode we let it:
 *
 *  - The TUN has IFF_VNET_HDR with TSO4 and checksum offload.  One read()
 *    returns a virtio_net_hdr and a TCP "super-packet" of up to 64 KiB whose
 *    checksum is left to the "hardware", which is us.  We cut it into MSS-sized
 *    packets as the kernel's tcp_gso_segment would, and complete the partial
 *    checksums of other packets as skb_checksum_help would.  The cutting is
 *    ours, not the kernel's, because the wire must not change: one inner
 *    packet per datagram, so a plain peer (or flannel) sees nothing new.
 *  - Every datagram is copied into a send queue (struct fp_gso), where a run
 *    of equal-sized datagrams to one peer becomes one sendmmsg message with
 *    UDP_SEGMENT: one system call sends ~45 datagrams, which the kernel (or
 *    the NIC) cuts apart.  Copying costs little next to the checksum we must
 *    compute anyway, and lets small packets (ACKs) be trained up too.
 *  - With UDP_GRO on the socket the kernel hands such runs over whole; a cmsg
 *    gives the datagram size, and we walk the buffer one datagram at a time.
 *  - On the way into the TUN, a run of one flow's TCP segments becomes one
 *    write again: a TSO packet (writev of the first segment and the others'
 *    payloads, so nothing is copied) that the kernel's TCP takes whole, as
 *    it would from GRO.  This undoes our own cutting exactly, so the rules are
 *    the kernel's GRO rules (see gro_follows), and a segment whose checksum
 *    is wrong is never merged: the kernel does not check a merged one again.
 *    Anything else is written alone behind a zeroed virtio_net_hdr, and the
 *    kernel checks it as it would anyone's packet.
 *
 * If the kernel refuses UDP_SEGMENT (EIO: no checksum offload on the route;
 * EINVAL) we send those datagrams one by one, turn GSO off for good and say so
 * through FP_RC_GSO_OFF, as wireguard-go does with ErrUDPGSODisabled.
 */
#define _GNU_SOURCE
#include "_fastpath.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/virtio_net.h>
#include <netinet/udp.h>
#include <string.h>
#include <unistd.h>

_Static_assert(sizeof(struct virtio_net_hdr) == FP_VNET_HDR_LEN, "virtio_net_hdr size");
_Static_assert(CMSG_SPACE(sizeof(int)) <= FP_CMSG_WORDS * sizeof(uint64_t), "cmsg space");

enum { TCP_FIN = 0x01, TCP_PSH = 0x08, TCP_CWR = 0x80 };

static inline uint32_t min32(uint32_t a, uint32_t b) { return a < b ? a : b; }

static inline uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, v);
}

/* The one's complement sum (RFC 1071) of p[0..n) as big-endian 16-bit words,
 * plus sum, folded to 16 bits, not complemented.  Offload mode sums every byte
 * that passes, so this adds native 32-bit halves of 64-bit words into four
 * 64-bit accumulators (no carries lost below 2^32 words) and swaps bytes once
 * at the end: RFC 1071 2(B), the sum does not care about byte order. */
static uint32_t sum16(const uint8_t *p, size_t n, uint32_t sum)
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

/* RFC 1071 internet checksum. */
static uint32_t csum(const uint8_t *p, size_t n) { return ~sum16(p, n, 0) & 0xffff; }

/* The TCP/UDP pseudo-header sum of IPv4 packet p for an l4len-byte segment. */
static uint32_t pseudo_sum(const uint8_t *p, uint32_t l4len) { return sum16(p + 12, 8, p[9] + l4len); }

/* Complete a partial checksum as the kernel's skb_checksum_help does: the
 * field at start + off holds the pseudo-header sum, so sum [start, len) over
 * it.  0 goes out as 0xFFFF, the same number, and the only one UDP allows. */
static void csum_finish(uint8_t *p, uint32_t len, uint32_t start, uint32_t off)
{
    uint32_t s = ~sum16(p + start, len - start, 0) & 0xffff;
    put16(p + start + off, s ? s : 0xffff);
}

/* Count a drop and keep its first bytes in the drop ring (if there is one).
 * Only ever on the drop path: the forwarding path pays nothing for the ring. */
static void drop(struct fp_ctx *c, uint64_t *counter, uint32_t reason, uint32_t dir, uint32_t peer,
                 const uint8_t *p, uint32_t len, uint32_t count)
{
    *counter += count;
    if (!c->ndrops)
        return;
    struct fp_drop *d = &c->drops[c->drops_total++ % c->ndrops];
    d->time_ms = c->now_ms;
    d->peer = peer;
    d->len = len;
    d->reason = (uint8_t)reason;
    d->dir = (uint8_t)dir;
    d->count = (uint16_t)(count > 0xffff ? 0xffff : count);
    memcpy(d->data, p, len < FP_DROP_SNAP ? len : FP_DROP_SNAP);
}

static inline uint8_t *slot(const struct fp_ring *r, uint32_t i)
{
    return r->data + (size_t)i * r->slot_size + r->headroom;
}

/* The packet's total length if it is a sound IPv4 packet of n bytes, else 0.
 * Trailing bytes past the total length are ignored (and later not sent). */
static uint32_t ip_valid(const uint8_t *p, size_t n)
{
    if (n < 20 || p[0] >> 4 != 4)
        return 0;
    uint32_t ihl = (p[0] & 15) * 4u, tot = get16(p + 2);
    if (ihl < 20 || ihl > n || tot < ihl || tot > n || csum(p, ihl) != 0)
        return 0;
    return tot;
}

/* TTL - 1, checksum patched per RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'). */
static void ttl_dec(uint8_t *p)
{
    uint32_t m = get16(p + 8);
    p[8]--;
    uint32_t s = (~get16(p + 10) & 0xffff) + (~m & 0xffff) + get16(p + 8);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    put16(p + 10, ~s);
}

/* A write to the TUN; in offload mode behind a zeroed virtio_net_hdr (no GSO,
 * no checksum help: the kernel checks the packet like any other). */
static ssize_t tun_write(const struct fp_ctx *c, int fd, const uint8_t *p, uint32_t len)
{
    static const struct virtio_net_hdr plain;
    if (!(c->offload & FP_OFFLOAD_VNET))
        return write(fd, p, len);
    struct iovec iov[2] = {{(void *)&plain, sizeof plain}, {(void *)p, len}};
    ssize_t n = writev(fd, iov, 2);
    return n < (ssize_t)sizeof plain ? -1 : n - (ssize_t)sizeof plain;
}

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
static uint32_t icmp_error(struct fp_ctx *c, const uint8_t *p, uint32_t tot,
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

static void icmp_to_tun(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot,
                        uint8_t type, uint8_t code, uint32_t mtu, uint64_t now)
{
    uint32_t len = icmp_error(c, p, tot, type, code, mtu, now);
    if (len && tun_write(c, tun_fd, c->scratch, len) == (ssize_t)len)
        c->cnt.icmp_sent++;
}

static void count_batch(uint64_t *batches, uint64_t *multi, uint64_t *max, uint32_t n)
{
    (*batches)++;
    if (n > 1)
        (*multi)++;
    if (n > *max)
        *max = n;
}

/* ---- peers ----
 *
 * Open addressing with linear probing, keyed by address (0: empty), at most
 * half full.  refs counts the routes pointing at a peer; a peer goes when
 * its last route goes, and its counters with it. */

static inline uint32_t peer_home(uint32_t a, uint32_t cap)
{
    uint32_t i = a * 0x9e3779b1u;
    return (i ^ (i >> 16)) & (cap - 1);
}

static inline struct fp_peer *peer_slot(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    for (uint32_t i = peer_home(a, cap);; i = (i + 1) & (cap - 1)) {
        struct fp_peer *p = &t[i];
        if (p->addr == a || p->addr == 0)
            return p;
    }
}

static inline struct fp_peer *peer_find(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    struct fp_peer *p = peer_slot(t, cap, a);
    return a && p->addr == a ? p : NULL;
}

/* One more route points at peer a (new peers start with zero counters). */
static void peer_ref(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    struct fp_peer *p = peer_slot(t, cap, a);
    if (!p->addr)
        *p = (struct fp_peer){.addr = a};
    p->refs++;
}

/* One route fewer points at peer a; the last one takes the peer out
 * (backward-shift deletion: no tombstones, probes stay short). */
static void peer_unref(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    struct fp_peer *p = peer_find(t, cap, a);
    if (!p || --p->refs)
        return;
    uint32_t hole = (uint32_t)(p - t), mask = cap - 1;
    for (uint32_t j = (hole + 1) & mask; t[j].addr; j = (j + 1) & mask) {
        uint32_t home = peer_home(t[j].addr, cap);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            t[hole] = t[j];
            hole = j;
        }
    }
    t[hole] = (struct fp_peer){0};
}

/* ---- routes ----
 *
 * An open-addressing table of (prefix, len) -> peer, at most half full, and
 * a bitmap of the prefix lengths present.  Lookup probes once per length
 * present, longest first; a change costs the same whatever the table size. */

static inline uint32_t mask_of(uint32_t len) { return len ? 0xffffffffu << (32 - len) : 0; }

static int route_bad(uint32_t prefix, uint32_t len)
{
    return len > 32 || (prefix & ~mask_of(len));
}

static inline uint32_t route_home(uint32_t prefix, uint32_t len, uint32_t cap)
{
    uint64_t k = ((uint64_t)len << 32 | prefix) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(k >> 32) & (cap - 1);
}

/* The slot holding prefix/len, or the empty slot where it would go. */
static inline struct fp_route *route_slot(struct fp_route *t, uint32_t cap, uint32_t prefix, uint32_t len)
{
    for (uint32_t i = route_home(prefix, len, cap);; i = (i + 1) & (cap - 1)) {
        struct fp_route *r = &t[i];
        if (!r->peer || (r->prefix == prefix && r->len == len))
            return r;
    }
}

static inline uint32_t route_peer(const struct fp_ctx *c, uint32_t prefix, uint32_t len)
{
    return route_slot(c->routes, c->route_cap, prefix, len)->peer;
}

uint32_t fp_lookup(const struct fp_ctx *c, uint32_t dst)
{
    for (uint64_t m = c->len_mask; m;) {
        uint32_t len = 63 - (uint32_t)__builtin_clzll(m);
        uint32_t peer = route_peer(c, dst & mask_of(len), len);
        if (peer)
            return peer;
        m &= ~(1ull << len);
    }
    return 0;
}

static void count_len(struct fp_ctx *c, uint32_t len, int delta)
{
    c->len_count[len] += (uint32_t)delta;
    if (c->len_count[len])
        c->len_mask |= 1ull << len;
    else
        c->len_mask &= ~(1ull << len);
}

/* Insert or repoint a route whose new peer is already referenced. */
static void route_put(struct fp_ctx *c, uint32_t prefix, uint32_t len, uint32_t peer)
{
    struct fp_route *r = route_slot(c->routes, c->route_cap, prefix, len);
    if (r->peer) {
        peer_unref(c->peers, c->peer_cap, r->peer);
        r->peer = peer;
        return;
    }
    *r = (struct fp_route){.prefix = prefix, .peer = peer, .len = (uint8_t)len};
    c->nroutes++;
    count_len(c, len, 1);
}

static void route_del(struct fp_ctx *c, uint32_t prefix, uint32_t len)
{
    struct fp_route *t = c->routes;
    struct fp_route *r = route_slot(t, c->route_cap, prefix, len);
    if (!r->peer)
        return;
    peer_unref(c->peers, c->peer_cap, r->peer);
    uint32_t hole = (uint32_t)(r - t), mask = c->route_cap - 1;
    for (uint32_t j = (hole + 1) & mask; t[j].peer; j = (j + 1) & mask) {
        uint32_t home = route_home(t[j].prefix, t[j].len, c->route_cap);
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            t[hole] = t[j];
            hole = j;
        }
    }
    t[hole] = (struct fp_route){0};
    c->nroutes--;
    count_len(c, len, -1);
}

static inline uint64_t rkey(const struct fp_route *r) { return (uint64_t)r->len << 32 | r->prefix; }

/* Heapsort: in place and allocation-free, unlike glibc's qsort. */
static void sift(struct fp_route *a, uint32_t i, uint32_t n)
{
    for (uint32_t child; (child = 2 * i + 1) < n; i = child) {
        if (child + 1 < n && rkey(&a[child + 1]) > rkey(&a[child]))
            child++;
        if (rkey(&a[i]) >= rkey(&a[child]))
            return;
        struct fp_route t = a[i];
        a[i] = a[child];
        a[child] = t;
    }
}

static void sort_routes(struct fp_route *a, uint32_t n)
{
    for (uint32_t i = n / 2; i-- > 0;)
        sift(a, i, n);
    for (uint32_t end = n; end-- > 1;) {
        struct fp_route t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift(a, 0, end);
    }
}

static int sorted_has(const struct fp_route *a, uint32_t n, const struct fp_route *r)
{
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (rkey(&a[mid]) < rkey(r))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && rkey(&a[lo]) == rkey(r);
}

int fp_update_routes(struct fp_ctx *c, struct fp_route *del, uint32_t ndel, struct fp_route *add,
                     uint32_t nadd)
{
    for (uint32_t i = 0; i < ndel; i++)
        if (route_bad(del[i].prefix, del[i].len))
            return -EINVAL;
    for (uint32_t i = 0; i < nadd; i++)
        if (route_bad(add[i].prefix, add[i].len) || add[i].peer == 0)
            return -EINVAL;
    sort_routes(del, ndel);
    sort_routes(add, nadd);
    for (uint32_t i = 1; i < nadd; i++)
        if (rkey(&add[i]) == rkey(&add[i - 1]))
            return -EINVAL;
    /* The size afterwards, before touching anything: an error changes nothing. */
    uint64_t n = c->nroutes;
    for (uint32_t i = 0; i < ndel; i++)
        if ((i == 0 || rkey(&del[i]) != rkey(&del[i - 1])) && !sorted_has(add, nadd, &del[i]) &&
            route_peer(c, del[i].prefix, del[i].len))
            n--;
    for (uint32_t i = 0; i < nadd; i++)
        if (!route_peer(c, add[i].prefix, add[i].len))
            n++;
    if (n > c->max_routes)
        return -ENOSPC;
    /* New references first, so a peer that keeps any route keeps its counters. */
    for (uint32_t i = 0; i < nadd; i++)
        peer_ref(c->peers, c->peer_cap, add[i].peer);
    for (uint32_t i = 0; i < ndel; i++)
        if (!sorted_has(add, nadd, &del[i]))
            route_del(c, del[i].prefix, del[i].len);
    for (uint32_t i = 0; i < nadd; i++)
        route_put(c, add[i].prefix, add[i].len, add[i].peer);
    return 0;
}

int fp_add_route(struct fp_ctx *c, uint32_t prefix, uint32_t len, uint32_t peer)
{
    struct fp_route r = {.prefix = prefix, .peer = peer, .len = (uint8_t)len};
    if (len > 32)
        return -EINVAL;
    return fp_update_routes(c, NULL, 0, &r, 1);
}

int fp_del_route(struct fp_ctx *c, uint32_t prefix, uint32_t len)
{
    struct fp_route r = {.prefix = prefix, .len = (uint8_t)len};
    if (route_bad(prefix, len))
        return -EINVAL;
    if (!route_peer(c, prefix, len))
        return -ENOENT;
    return fp_update_routes(c, &r, 1, NULL, 0);
}

/* Build the tables in routes_alt/peers_alt from in[0..n) and swap them in,
 * keeping the counters of peers that stay. */
static int rebuild(struct fp_ctx *c, const struct fp_route *in, uint32_t n)
{
    struct fp_route *rt = c->routes_alt, *tr;
    struct fp_peer *pt = c->peers_alt, *tp;
    memset(rt, 0, (size_t)c->route_cap * sizeof *rt);
    memset(pt, 0, (size_t)c->peer_cap * sizeof *pt);
    uint32_t count[33] = {0};
    uint64_t lens = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct fp_route *r = route_slot(rt, c->route_cap, in[i].prefix, in[i].len);
        if (r->peer)
            return -EINVAL; /* listed twice */
        *r = (struct fp_route){.prefix = in[i].prefix, .peer = in[i].peer, .len = in[i].len};
        struct fp_peer *p = peer_slot(pt, c->peer_cap, in[i].peer);
        if (!p->addr) {
            struct fp_peer *old = peer_find(c->peers, c->peer_cap, in[i].peer);
            *p = old ? *old : (struct fp_peer){.addr = in[i].peer};
            p->refs = 0;
        }
        p->refs++;
        count[in[i].len]++;
        lens |= 1ull << in[i].len;
    }
    tr = c->routes, c->routes = rt, c->routes_alt = tr;
    tp = c->peers, c->peers = pt, c->peers_alt = tp;
    c->nroutes = n;
    c->len_mask = lens;
    memcpy(c->len_count, count, sizeof count);
    return 0;
}

int fp_set_routes(struct fp_ctx *c, const struct fp_route *in, uint32_t n)
{
    if (n > c->max_routes)
        return -ENOSPC;
    for (uint32_t i = 0; i < n; i++)
        if (route_bad(in[i].prefix, in[i].len) || in[i].peer == 0)
            return -EINVAL;
    return rebuild(c, in, n);
}

int fp_resize(struct fp_ctx *c, struct fp_route *routes, struct fp_route *routes_alt, struct fp_peer *peers,
              struct fp_peer *peers_alt, uint32_t max_routes, uint32_t route_cap, uint32_t peer_cap)
{
    if (!routes || !routes_alt || !peers || !peers_alt)
        return -EFAULT;
    if (max_routes < c->nroutes || max_routes < 1 || (uint64_t)route_cap < 2 * (uint64_t)max_routes ||
        (route_cap & (route_cap - 1)) || (uint64_t)peer_cap < 4 * (uint64_t)max_routes ||
        (peer_cap & (peer_cap - 1)))
        return -EINVAL;
    memset(routes, 0, (size_t)route_cap * sizeof *routes);
    for (uint32_t i = 0; i < c->route_cap; i++)
        if (c->routes[i].peer)
            *route_slot(routes, route_cap, c->routes[i].prefix, c->routes[i].len) = c->routes[i];
    memset(peers, 0, (size_t)peer_cap * sizeof *peers);
    for (uint32_t i = 0; i < c->peer_cap; i++)
        if (c->peers[i].addr)
            *peer_slot(peers, peer_cap, c->peers[i].addr) = c->peers[i];
    c->routes = routes;
    c->routes_alt = routes_alt;
    c->peers = peers;
    c->peers_alt = peers_alt;
    c->max_routes = max_routes;
    c->route_cap = route_cap;
    c->peer_cap = peer_cap;
    return 0;
}

/* ---- setup ---- */

int fp_init(struct fp_ctx *c)
{
    struct fp_ring *r = &c->ring;
    struct fp_gso *g = &c->gso;
    if (!r->data || !r->len || !r->addr || !r->iov || !r->msg || !c->routes ||
        !c->routes_alt || !c->peers || !c->peers_alt || (c->ndrops && !c->drops))
        return -EFAULT;
    if (c->batch < 1 || c->batch > r->nslots || r->slot_size <= r->headroom ||
        r->slot_size - r->headroom > FP_MAX_PACKET || c->mtu < 68 || c->mtu > FP_MAX_PACKET ||
        c->max_routes < 1 || (uint64_t)c->route_cap < 2 * (uint64_t)c->max_routes ||
        (c->route_cap & (c->route_cap - 1)) || (uint64_t)c->peer_cap < 4 * (uint64_t)c->max_routes ||
        (c->peer_cap & (c->peer_cap - 1)) || (c->offload & ~(FP_OFFLOAD_VNET | FP_OFFLOAD_UDP_GSO)))
        return -EINVAL;
    if (c->offload) {
        if (!g->out || !g->msg || !g->iov || !g->addr || !g->segs || !g->seg_size || !g->cmsg ||
            !g->rx_cmsg || !g->tun_iov)
            return -EFAULT;
        if (g->nmsg < 1 || g->out_size < FP_MAX_PACKET ||
            ((c->offload & FP_OFFLOAD_VNET) && r->headroom < FP_VNET_HDR_LEN))
            return -EINVAL;
        for (uint32_t i = 0; i < g->nmsg; i++) {
            memset(&g->msg[i], 0, sizeof g->msg[i]);
            g->msg[i].msg_hdr.msg_name = &g->addr[i];
            g->msg[i].msg_hdr.msg_namelen = sizeof g->addr[i];
            g->msg[i].msg_hdr.msg_iov = &g->iov[i];
            g->msg[i].msg_hdr.msg_iovlen = 1;
        }
        g->n = g->used = g->gro_segs = 0;
    }
    for (uint32_t i = 0; i < r->nslots; i++) {
        r->iov[i] = (struct iovec){.iov_base = slot(r, i), .iov_len = 0};
        memset(&r->msg[i], 0, sizeof r->msg[i]);
        r->msg[i].msg_hdr.msg_name = &r->addr[i];
        r->msg[i].msg_hdr.msg_namelen = sizeof r->addr[i];
        r->msg[i].msg_hdr.msg_iov = &r->iov[i];
        r->msg[i].msg_hdr.msg_iovlen = 1;
        r->len[i] = 0;
    }
    memset(c->routes, 0, (size_t)c->route_cap * sizeof *c->routes);
    memset(c->peers, 0, (size_t)c->peer_cap * sizeof *c->peers);
    memset(c->len_count, 0, sizeof c->len_count);
    memset(&c->cnt, 0, sizeof c->cnt);
    c->gso_errno = 0;
    c->drops_total = 0;
    c->now_ms = 0;
    c->nroutes = 0;
    c->len_mask = 0;
    c->tokens = (uint64_t)c->icmp_burst * 1000;
    c->last_ms = 0;
    return 0;
}

/* ---- tun -> udp ---- */

/* Where packet p goes: its peer, or 0 if it is dropped here (counted, and
 * maybe answered with an ICMP error).  seg is the length of the datagrams it
 * will leave as: its own, or a TSO segment's. */
static uint32_t next_hop(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot,
                         uint32_t seg, uint64_t now)
{
    uint32_t peer = fp_lookup(c, get32(p + 16));
    if (!peer) {
        drop(c, &c->cnt.drop_no_route, FP_DROP_NO_ROUTE, FP_DIR_TX, 0, p, tot, 1);
        icmp_to_tun(c, tun_fd, p, tot, 3, 0, 0, now);
    } else if (p[8] <= 1) {
        drop(c, &c->cnt.drop_ttl, FP_DROP_TTL, FP_DIR_TX, peer, p, tot, 1);
        icmp_to_tun(c, tun_fd, p, tot, 11, 0, 0, now);
    } else if (seg > c->mtu && (get16(p + 6) & 0x4000)) {
        drop(c, &c->cnt.drop_too_big, FP_DROP_TOO_BIG, FP_DIR_TX, peer, p, tot, 1);
        icmp_to_tun(c, tun_fd, p, tot, 3, 4, c->mtu, now);
    } else {
        return peer;
    }
    return 0;
}

static void count_sent(struct fp_ctx *c, const struct sockaddr_in *a, uint32_t packets, uint64_t bytes)
{
    struct fp_peer *p = peer_find(c->peers, c->peer_cap, ntohl(a->sin_addr.s_addr));
    c->cnt.tx_packets += packets;
    c->cnt.tx_bytes += bytes;
    if (p) {
        p->tx_packets += packets;
        p->tx_bytes += bytes;
    }
}

static void send_dropped(struct fp_ctx *c, const struct sockaddr_in *a, const uint8_t *p, uint32_t len,
                         uint32_t count)
{
    drop(c, &c->cnt.drop_send, FP_DROP_SEND, FP_DIR_TX, ntohl(a->sin_addr.s_addr), p, len, count);
}

/* Send ring slots [0, n) with as few sendmmsg calls as the kernel allows. */
static void send_batch(struct fp_ctx *c, int fd, uint32_t n)
{
    struct fp_ring *r = &c->ring;
    for (uint32_t done = 0; done < n;) {
        int k = sendmmsg(fd, r->msg + done, n - done, MSG_DONTWAIT);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            if (k == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                for (; done < n; done++) /* socket full: drop the rest */
                    send_dropped(c, &r->addr[done], slot(r, done), r->len[done], 1);
                return;
            }
            /* this one datagram is refused: skip it */
            send_dropped(c, &r->addr[done], slot(r, done), r->len[done], 1);
            done++;
            continue;
        }
        count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch,
                    (uint32_t)k);
        for (uint32_t i = done; i < done + (uint32_t)k; i++)
            count_sent(c, &r->addr[i], 1, r->len[i]);
        done += (uint32_t)k;
    }
}

/* The plain path: one packet per read, sent as it is. */
static int tun_to_udp_plain(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    struct fp_ring *r = &c->ring;
    uint32_t cap = r->slot_size - r->headroom, taken = 0, n = 0;
    int err = 0;
    while (taken < c->batch) {
        uint8_t *p = slot(r, n);
        ssize_t got = read(tun_fd, p, cap);
        if (got < 0) {
            err = -errno; /* reported only if nothing was read; it will recur */
            break;
        }
        taken++;
        uint32_t tot = ip_valid(p, (size_t)got), peer;
        if (!tot) {
            drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_TX, 0, p, (uint32_t)got, 1);
        } else if ((peer = next_hop(c, tun_fd, p, tot, tot, now))) {
            ttl_dec(p);
            r->len[n] = tot;
            r->iov[n].iov_len = tot;
            r->addr[n] = (struct sockaddr_in){
                .sin_family = AF_INET,
                .sin_port = htons(c->port),
                .sin_addr.s_addr = htonl(peer),
            };
            n++;
        }
    }
    send_batch(c, udp_fd, n);
    return taken ? (int)taken : err;
}

/* Offload mode: send queued messages [from, n) a datagram at a time, because
 * the kernel just refused UDP_SEGMENT.  Happens once in a process's life. */
static void send_singly(struct fp_ctx *c, int fd, uint32_t from)
{
    struct fp_gso *g = &c->gso;
    for (uint32_t i = from; i < g->n; i++) {
        const uint8_t *p = g->iov[i].iov_base;
        uint32_t left = (uint32_t)g->iov[i].iov_len;
        for (uint32_t len; left; p += len, left -= len) {
            len = min32(left, g->seg_size[i]);
            if (sendto(fd, p, len, MSG_DONTWAIT, (struct sockaddr *)&g->addr[i],
                       sizeof g->addr[i]) != (ssize_t)len) {
                send_dropped(c, &g->addr[i], p, len, 1);
                continue;
            }
            count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch, 1);
            count_sent(c, &g->addr[i], 1, len);
        }
    }
}

/* Send the whole queue, a UDP_SEGMENT cmsg on each message of several
 * datagrams, with as few sendmmsg calls as the kernel allows; empty it. */
static void gso_flush(struct fp_ctx *c, int fd)
{
    struct fp_gso *g = &c->gso;
    uint32_t n = g->n;
    for (uint32_t i = 0; i < n; i++) {
        struct msghdr *h = &g->msg[i].msg_hdr;
        h->msg_control = NULL;
        h->msg_controllen = 0;
        if (g->segs[i] > 1) {
            uint16_t size = (uint16_t)g->seg_size[i];
            h->msg_control = g->cmsg + (size_t)i * FP_CMSG_WORDS;
            h->msg_controllen = CMSG_SPACE(sizeof size);
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof size);
            memcpy(CMSG_DATA(cm), &size, sizeof size);
        }
    }
    for (uint32_t done = 0; done < n;) {
        int k = sendmmsg(fd, g->msg + done, n - done, MSG_DONTWAIT);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            if (k == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                for (; done < n; done++)
                    send_dropped(c, &g->addr[done], g->iov[done].iov_base, g->seg_size[done],
                                 g->segs[done]);
                break;
            }
            if ((errno == EIO || errno == EINVAL) && g->segs[done] > 1) {
                c->offload &= ~(uint32_t)FP_OFFLOAD_UDP_GSO;
                c->gso_errno = errno;
                send_singly(c, fd, done);
                break;
            }
            send_dropped(c, &g->addr[done], g->iov[done].iov_base, g->seg_size[done], g->segs[done]);
            done++;
            continue;
        }
        uint32_t sent = 0;
        for (uint32_t i = done; i < done + (uint32_t)k; i++) {
            count_sent(c, &g->addr[i], g->segs[i], g->iov[i].iov_len);
            sent += g->segs[i];
            if (g->segs[i] > 1) {
                c->cnt.gso_sends++;
                c->cnt.gso_segments += g->segs[i];
            }
        }
        count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch, sent);
        done += (uint32_t)k;
    }
    g->n = g->used = 0;
}

/* Room for one len-byte datagram to peer at the end of the queue: in the last
 * message if UDP_SEGMENT can carry the two together (same peer, that message's
 * datagrams all full-sized and no bigger than the MTU, so the kernel never has
 * to fragment one, and within the kernel's limits), else in a new message. */
static uint8_t *gso_add(struct fp_ctx *c, int fd, uint32_t peer, uint32_t len)
{
    struct fp_gso *g = &c->gso;
    uint32_t i = g->n - 1;
    if (g->n && (c->offload & FP_OFFLOAD_UDP_GSO) && g->addr[i].sin_addr.s_addr == htonl(peer) &&
        len <= g->seg_size[i] && g->seg_size[i] <= c->mtu && g->segs[i] < FP_GSO_MAX_SEGS &&
        g->iov[i].iov_len == (size_t)g->segs[i] * g->seg_size[i] &&
        g->iov[i].iov_len + len <= FP_GSO_MAX_BYTES && g->used + len <= g->out_size) {
        g->segs[i]++;
        g->iov[i].iov_len += len;
        g->used += len;
        return g->out + g->used - len;
    }
    if (g->n == g->nmsg || g->used + len > g->out_size)
        gso_flush(c, fd);
    i = g->n++;
    g->iov[i] = (struct iovec){.iov_base = g->out + g->used, .iov_len = len};
    g->addr[i] = (struct sockaddr_in){
        .sin_family = AF_INET,
        .sin_port = htons(c->port),
        .sin_addr.s_addr = htonl(peer),
    };
    g->segs[i] = 1;
    g->seg_size[i] = len;
    g->used += len;
    return g->iov[i].iov_base;
}

/* Queue TSO packet p (tot bytes, TCP headers ending at hlen) as the packets
 * the kernel's tcp_gso_segment would make of it: mss payload bytes each, IP
 * ID + 1 and sequence number + mss per packet, FIN and PSH only on the last,
 * CWR only on the first, both checksums computed afresh. */
static void tso_split(struct fp_ctx *c, int fd, const uint8_t *p, uint32_t tot, uint32_t hlen,
                      uint32_t mss, uint32_t peer)
{
    uint32_t ihl = (p[0] & 15) * 4u, seq = get32(p + ihl + 4), id = get16(p + 4), n = 0;
    for (uint32_t off = hlen; n == 0 || off < tot; off += mss, n++) {
        uint32_t len = hlen + min32(mss, tot - off);
        uint8_t *o = gso_add(c, fd, peer, len);
        memcpy(o, p, hlen);
        memcpy(o + hlen, p + off, len - hlen);
        put16(o + 2, len);
        put16(o + 4, id + n);
        put16(o + 10, 0);
        put16(o + 10, csum(o, ihl));
        put32(o + ihl + 4, seq + (off - hlen));
        if (off + mss < tot)
            o[ihl + 13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (n)
            o[ihl + 13] &= (uint8_t)~TCP_CWR;
        put16(o + ihl + 16, pseudo_sum(o, len - ihl));
        csum_finish(o, len, ihl, 16);
    }
    c->cnt.tso_packets++;
    c->cnt.tso_segments += n;
}

/* One read from the TUN in offload mode (v is zero without IFF_VNET_HDR):
 * checked, completed or cut up, routed, queued. */
static void tx_packet(struct fp_ctx *c, int tun_fd, int udp_fd, uint8_t *p, size_t n,
                      const struct virtio_net_hdr *v, uint64_t now)
{
    uint32_t tot = ip_valid(p, n), ihl, hlen = 0, seg = tot, peer;
    if (!tot)
        goto malformed;
    ihl = (p[0] & 15) * 4u;
    if (v->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        /* hdr_len is not trusted: on the forwarding path it can be a whole packet. */
        if ((v->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_TCPV4 || p[9] != 6 ||
            !v->gso_size || (get16(p + 6) & 0x3fff) || ihl + 20 > tot)
            goto malformed;
        hlen = ihl + (p[ihl + 12] >> 4) * 4u;
        if (hlen < ihl + 20 || hlen > tot)
            goto malformed;
        seg = min32(tot, hlen + v->gso_size);
    } else if (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if ((uint32_t)v->csum_start + v->csum_offset + 2 > tot)
            goto malformed;
        csum_finish(p, tot, v->csum_start, v->csum_offset);
        c->cnt.csum_completed++;
    }
    if (!(peer = next_hop(c, tun_fd, p, tot, seg, now)))
        return;
    ttl_dec(p);
    if (hlen)
        tso_split(c, udp_fd, p, tot, hlen, v->gso_size, peer);
    else
        memcpy(gso_add(c, udp_fd, peer, tot), p, tot);
    return;
malformed:
    drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_TX, 0, p, (uint32_t)n, 1);
}

static int tun_to_udp_offload(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    struct fp_ring *r = &c->ring;
    uint32_t vnet = c->offload & FP_OFFLOAD_VNET ? FP_VNET_HDR_LEN : 0;
    uint32_t cap = r->slot_size - r->headroom, taken = 0, gso = c->offload & FP_OFFLOAD_UDP_GSO;
    uint8_t *p = slot(r, 0); /* every packet is copied out before the next read */
    struct virtio_net_hdr v = {0};
    int err = 0;
    while (taken < c->batch) {
        ssize_t got = read(tun_fd, p - vnet, cap + vnet);
        if (got < 0) {
            err = -errno;
            break;
        }
        taken++;
        if ((size_t)got < vnet) {
            drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_TX, 0, p, 0, 1);
            continue;
        }
        memcpy(&v, p - vnet, vnet);
        tx_packet(c, tun_fd, udp_fd, p, (size_t)got - vnet, &v, now);
    }
    gso_flush(c, udp_fd);
    if (!taken)
        return err;
    return (int)taken | (gso && !(c->offload & FP_OFFLOAD_UDP_GSO) ? FP_RC_GSO_OFF : 0);
}

int fp_tun_to_udp(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    c->now_ms = now;
    return c->offload ? tun_to_udp_offload(c, tun_fd, udp_fd, now)
                      : tun_to_udp_plain(c, tun_fd, udp_fd, now);
}

/* ---- udp -> tun ---- */

/* The datagram size of a UDP_GRO buffer of len bytes (len if it holds one). */
static uint32_t gro_size(struct msghdr *h, uint32_t len)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        int size;
        if (cm->cmsg_level != SOL_UDP || cm->cmsg_type != UDP_GRO ||
            cm->cmsg_len < CMSG_LEN(sizeof size))
            continue;
        memcpy(&size, CMSG_DATA(cm), sizeof size);
        if (size > 0 && (uint32_t)size < len)
            return (uint32_t)size;
    }
    return len;
}

/* A packet written to the TUN as it is, and counted. */
static void rx_write(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot,
                     struct fp_peer *peer)
{
    if (tun_write(c, tun_fd, p, tot) != (ssize_t)tot) {
        drop(c, &c->cnt.drop_tun_write, FP_DROP_TUN_WRITE, FP_DIR_RX, peer->addr, p, tot, 1);
        return;
    }
    c->cnt.rx_packets++;
    c->cnt.rx_bytes += tot;
    peer->rx_packets++;
    peer->rx_bytes += tot;
}

/* Write the coalesced segments, if any: one segment as it is, several as one
 * TSO super-packet.  Its first segment's headers become the super-packet's:
 * total length and header checksum redone, PSH if the last had it, and the
 * TCP checksum left partial (the pseudo-header sum, VIRTIO_NET_HDR_F_NEEDS_CSUM)
 * as a TSO sender hands it over: the kernel fills it in if it ever cuts the
 * packet up again, and trusts it if it delivers the packet locally, which is
 * why gro_add checked every segment's checksum. */
static void gro_flush(struct fp_ctx *c, int tun_fd)
{
    struct fp_gso *g = &c->gso;
    uint32_t n = g->gro_segs;
    if (!n)
        return;
    uint8_t *h = g->tun_iov[1].iov_base;
    g->gro_segs = 0;
    if (n == 1) {
        rx_write(c, tun_fd, h, g->gro_len, g->gro_peer);
        return;
    }
    uint32_t hlen = 20 + (h[32] >> 4) * 4u;
    struct virtio_net_hdr v = {
        .flags = VIRTIO_NET_HDR_F_NEEDS_CSUM,
        .gso_type = VIRTIO_NET_HDR_GSO_TCPV4,
        .hdr_len = (uint16_t)hlen,
        .gso_size = (uint16_t)g->gro_mss,
        .csum_start = 20,
        .csum_offset = 16,
    };
    put16(h + 2, g->gro_len);
    put16(h + 10, 0);
    put16(h + 10, csum(h, 20));
    put16(h + 36, pseudo_sum(h, g->gro_len - 20));
    g->tun_iov[0] = (struct iovec){.iov_base = &v, .iov_len = sizeof v};
    if (writev(tun_fd, g->tun_iov, (int)n + 1) != (ssize_t)(sizeof v + g->gro_len)) {
        drop(c, &c->cnt.drop_tun_write, FP_DROP_TUN_WRITE, FP_DIR_RX, g->gro_peer->addr, h,
             (uint32_t)g->tun_iov[1].iov_len, n);
        return;
    }
    c->cnt.tun_gso_writes++;
    c->cnt.tun_gso_segments += n;
    c->cnt.rx_packets += n;
    c->cnt.rx_bytes += g->gro_bytes;
    g->gro_peer->rx_packets += n;
    g->gro_peer->rx_bytes += g->gro_bytes;
}

/* Whether p (tot bytes, TTL already decremented) is a TCP segment we may
 * coalesce: no IP options or fragments, ACK with at most PSH, some payload,
 * and a correct checksum, since the kernel will not check it again. */
static int gro_candidate(const uint8_t *p, uint32_t tot)
{
    if (p[0] != 0x45 || p[9] != 6 || (get16(p + 6) & 0x3fff) || tot < 40)
        return 0;
    uint32_t hlen = 20 + (p[32] >> 4) * 4u;
    return hlen >= 40 && hlen < tot && (p[33] & ~TCP_PSH) == 0x10 &&
           sum16(p + 20, tot - 20, pseudo_sum(p, tot - 20)) == 0xffff;
}

/* Whether candidate p continues the coalesced segments, as the kernel's GRO
 * would have it: the same headers but for the length, checksums and PSH; the
 * next IP ID and sequence number; no more payload than the first. */
static int gro_follows(const struct fp_gso *g, const uint8_t *p, uint32_t tot,
                       const struct fp_peer *peer)
{
    const uint8_t *h = g->tun_iov[1].iov_base;
    uint32_t hlen = 20 + (h[32] >> 4) * 4u;
    return peer == g->gro_peer && !g->gro_closed && g->gro_segs < FP_GRO_MAX_SEGS &&
           tot - hlen <= g->gro_mss && g->gro_len + (tot - hlen) <= FP_MAX_PACKET &&
           get16(p + 4) == ((get16(h + 4) + g->gro_segs) & 0xffff) && get32(p + 24) == g->gro_seq &&
           !memcmp(p, h, 2) && !memcmp(p + 6, h + 6, 4) && !memcmp(p + 12, h + 12, 12) &&
           !memcmp(p + 28, h + 28, 5) && (p[33] & ~TCP_PSH) == h[33] &&
           !memcmp(p + 34, h + 34, 2) && !memcmp(p + 38, h + 38, hlen - 38);
}

/* Offload mode's TUN write: coalesce runs of one flow's TCP segments into
 * one write (the kernel's TCP then takes 64 KiB at a time, not 1.4); write
 * anything else as it is, after what was pending, so the order holds. */
static void gro_add(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, struct fp_peer *peer)
{
    struct fp_gso *g = &c->gso;
    if (!gro_candidate(p, tot)) {
        gro_flush(c, tun_fd);
        rx_write(c, tun_fd, p, tot, peer);
        return;
    }
    uint32_t hlen = 20 + (p[32] >> 4) * 4u, payload = tot - hlen;
    if (g->gro_segs && gro_follows(g, p, tot, peer)) {
        g->tun_iov[++g->gro_segs] = (struct iovec){.iov_base = p + hlen, .iov_len = payload};
        g->gro_len += payload;
        g->gro_bytes += tot;
        ((uint8_t *)g->tun_iov[1].iov_base)[33] |= p[33] & TCP_PSH;
    } else {
        gro_flush(c, tun_fd);
        g->tun_iov[1] = (struct iovec){.iov_base = p, .iov_len = tot};
        g->gro_segs = 1;
        g->gro_len = g->gro_bytes = tot;
        g->gro_mss = payload;
        g->gro_peer = peer;
    }
    g->gro_seq = get32(p + 24) + payload;
    g->gro_closed = payload < g->gro_mss || (p[33] & TCP_PSH);
}

/* One datagram from a known peer: checked, TTL - 1, written to the TUN.
 * Anti-spoofing, as WireGuard's allowed-ips: the inner source must route back
 * to the peer it came from (the longest match of the source is one of the
 * peer's subnets), or any host could inject packets "from" any other host's
 * pods.  One more lookup per packet, the same one the send side does. */
static void rx_packet(struct fp_ctx *c, int udp_fd, int tun_fd, uint8_t *p, uint32_t len,
                      const struct sockaddr_in *a, struct fp_peer *peer, uint64_t now)
{
    uint32_t tot, n;
    if (!(tot = ip_valid(p, len))) {
        drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_RX, peer->addr, p, len, 1);
    } else if (!c->allow_any_source && fp_lookup(c, get32(p + 12)) != peer->addr) {
        /* before the TTL check: no ICMP error to a forged source */
        drop(c, &c->cnt.drop_spoofed, FP_DROP_SPOOFED, FP_DIR_RX, peer->addr, p, tot, 1);
    } else if (p[8] <= 1) {
        drop(c, &c->cnt.drop_ttl, FP_DROP_TTL, FP_DIR_RX, peer->addr, p, tot, 1);
        n = icmp_error(c, p, tot, 11, 0, 0, now);
        if (n && sendto(udp_fd, c->scratch, n, MSG_DONTWAIT, (const struct sockaddr *)a,
                        sizeof *a) == (ssize_t)n)
            c->cnt.icmp_sent++;
    } else {
        ttl_dec(p);
        if (c->offload & FP_OFFLOAD_VNET)
            gro_add(c, tun_fd, p, tot, peer);
        else
            rx_write(c, tun_fd, p, tot, peer);
    }
}

int fp_udp_to_tun(struct fp_ctx *c, int udp_fd, int tun_fd, uint64_t now)
{
    struct fp_ring *r = &c->ring;
    uint32_t cap = r->slot_size - r->headroom, datagrams = 0;
    c->now_ms = now;
    for (uint32_t i = 0; i < c->batch; i++) {
        r->iov[i].iov_len = cap;
        r->msg[i].msg_hdr.msg_namelen = sizeof r->addr[i];
        if (c->offload) {
            r->msg[i].msg_hdr.msg_control = c->gso.rx_cmsg + (size_t)i * FP_CMSG_WORDS;
            r->msg[i].msg_hdr.msg_controllen = FP_CMSG_WORDS * sizeof(uint64_t);
        }
    }
    int k;
    do
        k = recvmmsg(udp_fd, r->msg, c->batch, MSG_DONTWAIT, NULL);
    while (k < 0 && errno == EINTR);
    if (k <= 0)
        return k < 0 ? -errno : 0;

    for (uint32_t i = 0; i < (uint32_t)k; i++) {
        struct msghdr *h = &r->msg[i].msg_hdr;
        struct sockaddr_in *a = &r->addr[i];
        uint8_t *p = slot(r, i);
        struct fp_peer *peer = NULL;
        uint32_t len = r->len[i] = r->msg[i].msg_len;
        /* Peers are known by address only: a socat or a NATed peer may send from any port. */
        if (h->msg_namelen >= sizeof *a && a->sin_family == AF_INET)
            peer = peer_find(c->peers, c->peer_cap, ntohl(a->sin_addr.s_addr));
        if (!peer) {
            uint32_t from = a->sin_family == AF_INET ? ntohl(a->sin_addr.s_addr) : 0;
            drop(c, &c->cnt.drop_unknown_peer, FP_DROP_UNKNOWN_PEER, FP_DIR_RX, from, p, len, 1);
            datagrams++;
        } else if (h->msg_flags & MSG_TRUNC) {
            drop(c, &c->cnt.drop_too_big, FP_DROP_TOO_BIG, FP_DIR_RX, peer->addr, p, len, 1);
            datagrams++;
        } else {
            uint32_t size = c->offload ? gro_size(h, len) : len, n = 0;
            for (uint32_t off = 0; n == 0 || off < len; off += size, n++)
                rx_packet(c, udp_fd, tun_fd, p + off, min32(size, len - off), a, peer, now);
            if (n > 1) {
                c->cnt.gro_receives++;
                c->cnt.gro_segments += n;
            }
            datagrams += n;
        }
    }
    gro_flush(c, tun_fd); /* the ring is refilled by the next call */
    count_batch(&c->cnt.rx_batches, &c->cnt.rx_multi_batches, &c->cnt.rx_max_batch, datagrams);
    return k;
}
