/*
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
 * its packet must route back to it (see rx_packet in plain.c), or it is
 * dropped as spoofed.  Both tables' probing is in internal.h: other rooms
 * probe them too.
 */
#include "internal.h"

/* ---- peers ----
 *
 * Open addressing with linear probing, keyed by address (0: empty): four
 * slots per route, so at most a quarter full between calls and half during a
 * batch, when the peers of routes going and coming coexist.  refs counts the routes pointing at a peer; a peer goes when
 * its last route goes, and its counters with it. */

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
