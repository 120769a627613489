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
 * mmsghdr/iovec/sockaddr arrays that point into it, the two route tables and
 * the two peer tables.  So nothing is allocated per packet and nothing can
 * leak; an error is just a -errno return value.
 *
 * Route lookup: the table is an array sorted by (32 - len, prefix), plus a
 * 33-bit mask of the prefix lengths present.  A lookup walks the present
 * lengths from longest to shortest and binary-searches for (len, dst & mask):
 * at most 33 searches of log2(n) steps, usually two or three, and the same
 * array is what Python reads back.  Changes are made on the spare ("alt")
 * table, which is then swapped in with a freshly built peer table, so a packet
 * sees the old table or the new one and never a mix.  Everything runs on one
 * thread, which is what makes the swap atomic.
 *
 * Peers (the set of next hops) live in an open-addressing hash table at most
 * half full, so the receive path can reject an unknown source in O(1).  It is
 * rebuilt on each route change, copying the counters of peers that stay.
 *
 * Time comes in as now_ms, so the ICMP token bucket is deterministic in tests.
 */
#define _GNU_SOURCE
#include "_fastpath.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

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

/* RFC 1071 internet checksum. */
static uint32_t csum(const uint8_t *p, size_t n)
{
    uint32_t s = 0;
    for (; n > 1; p += 2, n -= 2)
        s += get16(p);
    if (n)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return ~s & 0xffff;
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
    if (len && write(tun_fd, c->scratch, len) == (ssize_t)len)
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

/* ---- peers ---- */

static inline struct fp_peer *peer_slot(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    uint32_t i = a * 0x9e3779b1u;
    for (i ^= i >> 16;; i++) {
        struct fp_peer *p = &t[i & (cap - 1)];
        if (p->addr == a || p->addr == 0)
            return p;
    }
}

static inline struct fp_peer *peer_find(struct fp_peer *t, uint32_t cap, uint32_t a)
{
    struct fp_peer *p = peer_slot(t, cap, a);
    return a && p->addr == a ? p : NULL;
}

/* ---- routes ---- */

static inline uint32_t mask_of(uint32_t len) { return len ? 0xffffffffu << (32 - len) : 0; }

static inline uint64_t key(uint32_t prefix, uint32_t len) { return (uint64_t)(32 - len) << 32 | prefix; }

static inline uint64_t rkey(const struct fp_route *r) { return key(r->prefix, r->len); }

static int route_bad(uint32_t prefix, uint32_t len)
{
    return len > 32 || (prefix & ~mask_of(len));
}

/* Index of the first live route whose key is >= k. */
static uint32_t lower_bound(const struct fp_ctx *c, uint64_t k)
{
    uint32_t lo = 0, hi = c->nroutes;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (rkey(&c->routes[mid]) < k)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

uint32_t fp_lookup(const struct fp_ctx *c, uint32_t dst)
{
    for (uint64_t m = c->len_mask; m;) {
        uint32_t len = 63 - (uint32_t)__builtin_clzll(m);
        uint64_t k = key(dst & mask_of(len), len);
        uint32_t i = lower_bound(c, k);
        if (i < c->nroutes && rkey(&c->routes[i]) == k)
            return c->routes[i].peer;
        m &= ~(1ull << len);
    }
    return 0;
}

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

/* routes_alt[0..n) is the sorted, checked next table: build its peer table
 * (keeping the counters of peers that stay) and swap both in. */
static int commit(struct fp_ctx *c, uint32_t n)
{
    struct fp_route *rt = c->routes_alt;
    struct fp_peer *np = c->peers_alt, *tmp;
    uint64_t lens = 0;
    memset(np, 0, (size_t)c->peer_cap * sizeof *np);
    for (uint32_t i = 0; i < n; i++) {
        lens |= 1ull << rt[i].len;
        struct fp_peer *p = peer_slot(np, c->peer_cap, rt[i].peer);
        if (p->addr)
            continue;
        struct fp_peer *old = peer_find(c->peers, c->peer_cap, rt[i].peer);
        if (old)
            *p = *old;
        else
            p->addr = rt[i].peer;
    }
    c->routes_alt = c->routes;
    c->routes = rt;
    tmp = c->peers;
    c->peers = np;
    c->peers_alt = tmp;
    c->nroutes = n;
    c->len_mask = lens;
    return 0;
}

int fp_set_routes(struct fp_ctx *c, const struct fp_route *in, uint32_t n)
{
    if (n > c->max_routes)
        return -ENOSPC;
    for (uint32_t i = 0; i < n; i++)
        if (route_bad(in[i].prefix, in[i].len) || in[i].peer == 0)
            return -EINVAL;
    struct fp_route *rt = c->routes_alt;
    for (uint32_t i = 0; i < n; i++)
        rt[i] = (struct fp_route){.prefix = in[i].prefix, .peer = in[i].peer, .len = in[i].len};
    sort_routes(rt, n);
    for (uint32_t i = 1; i < n; i++)
        if (rkey(&rt[i]) == rkey(&rt[i - 1]))
            return -EINVAL;
    return commit(c, n);
}

int fp_add_route(struct fp_ctx *c, uint32_t prefix, uint32_t len, uint32_t peer)
{
    if (route_bad(prefix, len) || peer == 0)
        return -EINVAL;
    uint64_t k = key(prefix, len);
    uint32_t n = c->nroutes, i = lower_bound(c, k);
    uint32_t found = i < n && rkey(&c->routes[i]) == k;
    if (!found && n >= c->max_routes)
        return -ENOSPC;
    struct fp_route *rt = c->routes_alt;
    memcpy(rt, c->routes, (size_t)i * sizeof *rt);
    rt[i] = (struct fp_route){.prefix = prefix, .peer = peer, .len = (uint8_t)len};
    memcpy(rt + i + 1, c->routes + i + found, (size_t)(n - i - found) * sizeof *rt);
    return commit(c, n + !found);
}

int fp_del_route(struct fp_ctx *c, uint32_t prefix, uint32_t len)
{
    if (route_bad(prefix, len))
        return -EINVAL;
    uint64_t k = key(prefix, len);
    uint32_t n = c->nroutes, i = lower_bound(c, k);
    if (i >= n || rkey(&c->routes[i]) != k)
        return -ENOENT;
    struct fp_route *rt = c->routes_alt;
    memcpy(rt, c->routes, (size_t)i * sizeof *rt);
    memcpy(rt + i, c->routes + i + 1, (size_t)(n - i - 1) * sizeof *rt);
    return commit(c, n - 1);
}

/* ---- setup ---- */

int fp_init(struct fp_ctx *c)
{
    struct fp_ring *r = &c->ring;
    if (!r->data || !r->len || !r->addr || !r->iov || !r->msg || !c->routes ||
        !c->routes_alt || !c->peers || !c->peers_alt)
        return -EFAULT;
    if (c->batch < 1 || c->batch > r->nslots || r->slot_size <= r->headroom ||
        r->slot_size - r->headroom > FP_MAX_PACKET || c->mtu < 68 || c->mtu > FP_MAX_PACKET ||
        c->max_routes < 1 || (uint64_t)c->peer_cap < 2 * (uint64_t)c->max_routes ||
        (c->peer_cap & (c->peer_cap - 1)))
        return -EINVAL;
    for (uint32_t i = 0; i < r->nslots; i++) {
        r->iov[i] = (struct iovec){.iov_base = slot(r, i), .iov_len = 0};
        memset(&r->msg[i], 0, sizeof r->msg[i]);
        r->msg[i].msg_hdr.msg_name = &r->addr[i];
        r->msg[i].msg_hdr.msg_namelen = sizeof r->addr[i];
        r->msg[i].msg_hdr.msg_iov = &r->iov[i];
        r->msg[i].msg_hdr.msg_iovlen = 1;
        r->len[i] = 0;
    }
    memset(c->peers, 0, (size_t)c->peer_cap * sizeof *c->peers);
    memset(&c->cnt, 0, sizeof c->cnt);
    c->nroutes = 0;
    c->len_mask = 0;
    c->tokens = (uint64_t)c->icmp_burst * 1000;
    c->last_ms = 0;
    return 0;
}

/* ---- the two directions ---- */

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
                c->cnt.drop_send += n - done; /* socket full: drop the rest */
                return;
            }
            c->cnt.drop_send++; /* this one datagram is refused: skip it */
            done++;
            continue;
        }
        count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch,
                    (uint32_t)k);
        for (uint32_t i = done; i < done + (uint32_t)k; i++) {
            struct fp_peer *p = peer_find(c->peers, c->peer_cap, ntohl(r->addr[i].sin_addr.s_addr));
            c->cnt.tx_packets++;
            c->cnt.tx_bytes += r->len[i];
            if (p) {
                p->tx_packets++;
                p->tx_bytes += r->len[i];
            }
        }
        done += (uint32_t)k;
    }
}

int fp_tun_to_udp(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
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
            c->cnt.drop_malformed++;
        } else if (!(peer = fp_lookup(c, get32(p + 16)))) {
            c->cnt.drop_no_route++;
            icmp_to_tun(c, tun_fd, p, tot, 3, 0, 0, now);
        } else if (p[8] <= 1) {
            c->cnt.drop_ttl++;
            icmp_to_tun(c, tun_fd, p, tot, 11, 0, 0, now);
        } else if (tot > c->mtu && (get16(p + 6) & 0x4000)) {
            c->cnt.drop_too_big++;
            icmp_to_tun(c, tun_fd, p, tot, 3, 4, c->mtu, now);
        } else {
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

int fp_udp_to_tun(struct fp_ctx *c, int udp_fd, int tun_fd, uint64_t now)
{
    struct fp_ring *r = &c->ring;
    uint32_t cap = r->slot_size - r->headroom;
    for (uint32_t i = 0; i < c->batch; i++) {
        r->iov[i].iov_len = cap;
        r->msg[i].msg_hdr.msg_namelen = sizeof r->addr[i];
    }
    int k;
    do
        k = recvmmsg(udp_fd, r->msg, c->batch, MSG_DONTWAIT, NULL);
    while (k < 0 && errno == EINTR);
    if (k <= 0)
        return k < 0 ? -errno : 0;
    count_batch(&c->cnt.rx_batches, &c->cnt.rx_multi_batches, &c->cnt.rx_max_batch, (uint32_t)k);

    for (uint32_t i = 0; i < (uint32_t)k; i++) {
        struct msghdr *h = &r->msg[i].msg_hdr;
        struct sockaddr_in *a = &r->addr[i];
        uint8_t *p = slot(r, i);
        struct fp_peer *peer = NULL;
        uint32_t tot, len;
        r->len[i] = r->msg[i].msg_len;
        /* Peers are known by address only: a socat or a NATed peer may send from any port. */
        if (h->msg_namelen >= sizeof *a && a->sin_family == AF_INET)
            peer = peer_find(c->peers, c->peer_cap, ntohl(a->sin_addr.s_addr));
        if (!peer) {
            c->cnt.drop_unknown_peer++;
        } else if (h->msg_flags & MSG_TRUNC) {
            c->cnt.drop_too_big++;
        } else if (!(tot = ip_valid(p, r->len[i]))) {
            c->cnt.drop_malformed++;
        } else if (p[8] <= 1) {
            c->cnt.drop_ttl++;
            len = icmp_error(c, p, tot, 11, 0, 0, now);
            if (len && sendto(udp_fd, c->scratch, len, MSG_DONTWAIT, (struct sockaddr *)a,
                              sizeof *a) == (ssize_t)len)
                c->cnt.icmp_sent++;
        } else {
            ttl_dec(p);
            if (write(tun_fd, p, tot) != (ssize_t)tot) {
                c->cnt.drop_tun_write++;
                continue;
            }
            c->cnt.rx_packets++;
            c->cnt.rx_bytes += tot;
            peer->rx_packets++;
            peer->rx_bytes += tot;
        }
    }
    return k;
}
