/*
 * libFuzzer target: the route table (fp_add_route, fp_del_route,
 * fp_update_routes, fp_set_routes, fp_resize, fp_lookup) against a
 * brute-force model kept here: a plain list of routes, longest prefix match
 * by a linear scan, as WireGuard's allowedips_rand_test does.
 *
 * Input: one byte for max_routes (1..64), then operations, each one byte and
 * 6-byte route records (prefix u32 little-endian, len u8, peer u8):
 *
 *   0 ADD r     1 DEL r     2 UPDATE k, (k & 15) dels, (k >> 4 & 7) adds
 *   3 SET n, (n % 17) routes    4 RESIZE m    5 PROBE addr u32
 *
 * A record's len byte: bits 0-5 the length (so 33..63 are bad), bit 6 keeps
 * the prefix's host bits (bad unless len is 32).  Peer byte % 5: four peers,
 * or 0 (bad).
 *
 * After every operation: the return code is the one the model predicts
 * (-EINVAL, -ENOSPC, -ENOENT, 0); a failed change left everything as it was;
 * the table holds exactly the model's routes, nroutes, len_mask and
 * len_count agree, each peer's refs count its routes and no other peer is
 * present; a peer that stays keeps its counters and a new one starts at 0;
 * and lookups at every route's edges, and just outside them, match the
 * model.  Tables are heap blocks of the exact size, and fp_resize's old ones
 * are freed at once, so ASan sees any stray access.
 */
#define _GNU_SOURCE
#include "fastpath.h"
#include "check.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


enum { MAX_MODEL = 1024, NPEERS = 4 };


static uint32_t mask_of(uint32_t len) { return len == 0 ? 0 : len >= 32 ? 0xffffffffu : 0xffffffffu << (32 - len); }

static struct fp_route record(struct in *in)
{
    uint32_t prefix = take(in, 4), l = take(in, 1), p = take(in, 1) % (NPEERS + 1);
    uint32_t len = l & 63;
    if (!(l & 64) && len <= 32)
        prefix &= mask_of(len);
    return (struct fp_route){.prefix = prefix, .len = (uint8_t)len, .peer = p ? 0xc0000200 + p : 0};
}

static int bad(const struct fp_route *r) { return r->len > 32 || (r->prefix & ~mask_of(r->len)); }

/* ---- the model ---- */

struct model {
    struct fp_route r[MAX_MODEL];
    uint32_t n, max;
};

static int find(const struct model *m, uint32_t prefix, uint32_t len)
{
    for (uint32_t i = 0; i < m->n; i++)
        if (m->r[i].prefix == prefix && m->r[i].len == len)
            return (int)i;
    return -1;
}

static void put(struct model *m, const struct fp_route *r)
{
    int i = find(m, r->prefix, r->len);
    if (i >= 0)
        m->r[i].peer = r->peer;
    else
        m->r[m->n++] = *r;
}

static void del(struct model *m, uint32_t prefix, uint32_t len)
{
    int i = find(m, prefix, len);
    if (i >= 0)
        m->r[i] = m->r[--m->n];
}

static uint32_t lookup(const struct model *m, uint32_t addr)
{
    int best = -1;
    for (uint32_t i = 0; i < m->n; i++)
        if ((addr & mask_of(m->r[i].len)) == m->r[i].prefix && (best < 0 || m->r[i].len > m->r[best].len))
            best = (int)i;
    return best < 0 ? 0 : m->r[best].peer;
}

static int has_peer(const struct model *m, uint32_t peer)
{
    for (uint32_t i = 0; i < m->n; i++)
        if (m->r[i].peer == peer)
            return 1;
    return 0;
}

/* ---- the C side ---- */

struct tables {
    struct fp_route *routes, *routes_alt;
    struct fp_peer *peers, *peers_alt;
    uint32_t route_cap, peer_cap;
};

static struct tables new_tables(uint32_t max_routes)
{
    struct tables t = {.route_cap = 1, .peer_cap = 1};
    while (t.route_cap < 2 * max_routes)
        t.route_cap <<= 1;
    while (t.peer_cap < 4 * max_routes)
        t.peer_cap <<= 1;
    t.routes = calloc(t.route_cap, sizeof *t.routes);
    t.routes_alt = calloc(t.route_cap, sizeof *t.routes_alt);
    t.peers = calloc(t.peer_cap, sizeof *t.peers);
    t.peers_alt = calloc(t.peer_cap, sizeof *t.peers_alt);
    CHECK(t.routes && t.routes_alt && t.peers && t.peers_alt);
    return t;
}

static void free_tables(struct fp_ctx *c)
{
    free(c->routes), free(c->routes_alt), free(c->peers), free(c->peers_alt);
}

/* Mark every live peer's counters, to see which survive a change. */
static void stamp(struct fp_ctx *c, uint64_t gen)
{
    for (uint32_t i = 0; i < c->peer_cap; i++)
        if (c->peers[i].addr) {
            c->peers[i].tx_packets = gen << 32 | c->peers[i].addr;
            c->peers[i].rx_bytes = ~(gen << 32 | c->peers[i].addr);
        }
}

static void check_probe(const struct fp_ctx *c, const struct model *m, uint32_t addr)
{
    CHECK(fp_lookup(c, addr) == lookup(m, addr));
}

/* Lookups at a route's edges and just outside them. */
static void probe_edges(const struct fp_ctx *c, const struct model *m, const struct fp_route *r)
{
    if (bad(r))
        return;
    uint32_t lo = r->prefix, hi = lo | ~mask_of(r->len);
    check_probe(c, m, lo);
    check_probe(c, m, hi);
    check_probe(c, m, lo + (hi - lo) / 2);
    check_probe(c, m, lo - 1);
    check_probe(c, m, hi + 1);
}

/* The table is the model's, peers and counters included; probes is how many
 * of the model's routes to probe around (all of them is O(n^2)). */
static void check(const struct fp_ctx *c, const struct model *m, const struct model *before, uint64_t gen,
                  uint32_t probes)
{
    uint32_t refs_of[NPEERS + 1] = {0};
    for (uint32_t j = 0; j < m->n; j++)
        refs_of[m->r[j].peer - 0xc0000200]++;
    CHECK(c->nroutes == m->n);
    uint32_t count[33] = {0}, seen = 0;
    for (uint32_t i = 0; i < c->route_cap; i++) {
        const struct fp_route *r = &c->routes[i];
        if (!r->peer)
            continue;
        int j = find(m, r->prefix, r->len);
        CHECK(j >= 0 && m->r[j].peer == r->peer);
        count[r->len]++;
        seen++;
    }
    CHECK(seen == m->n);
    uint64_t mask = 0;
    for (uint32_t len = 0; len <= 32; len++) {
        CHECK(c->len_count[len] == count[len]);
        if (count[len])
            mask |= 1ull << len;
    }
    CHECK(c->len_mask == mask);
    uint32_t peers = 0;
    for (uint32_t i = 0; i < c->peer_cap; i++) {
        const struct fp_peer *p = &c->peers[i];
        if (!p->addr) {
            CHECK(p->refs == 0 && p->tx_packets == 0 && p->rx_bytes == 0);
            continue;
        }
        CHECK(p->addr > 0xc0000200 && p->addr <= 0xc0000200 + NPEERS);
        uint32_t refs = refs_of[p->addr - 0xc0000200];
        CHECK(refs > 0 && p->refs == refs);
        peers++;
        if (has_peer(before, p->addr)) {
            CHECK(p->tx_packets == (gen << 32 | p->addr) && p->rx_bytes == ~(gen << 32 | p->addr));
        } else {
            CHECK(p->tx_packets == 0 && p->rx_bytes == 0 && p->rx_packets == 0 && p->tx_bytes == 0);
        }
    }
    for (uint32_t a = 1; a <= NPEERS; a++)
        if (refs_of[a])
            peers--;
    CHECK(peers == 0);
    for (uint32_t i = 0; i < m->n && i < probes; i++)
        probe_edges(c, m, &m->r[i]);
}

/* The model's verdict on an update, applied to m when it succeeds. */
static int model_update(struct model *m, const struct fp_route *dels, uint32_t ndel, const struct fp_route *adds,
                        uint32_t nadd)
{
    for (uint32_t i = 0; i < ndel; i++)
        if (bad(&dels[i]))
            return -EINVAL;
    for (uint32_t i = 0; i < nadd; i++)
        if (bad(&adds[i]) || !adds[i].peer)
            return -EINVAL;
    for (uint32_t i = 0; i < nadd; i++)
        for (uint32_t j = 0; j < i; j++)
            if (adds[i].prefix == adds[j].prefix && adds[i].len == adds[j].len)
                return -EINVAL;
    static struct model next;
    next = *m;
    for (uint32_t i = 0; i < ndel; i++)
        del(&next, dels[i].prefix, dels[i].len);
    for (uint32_t i = 0; i < nadd; i++)
        put(&next, &adds[i]);
    if (next.n > m->max)
        return -ENOSPC;
    *m = next;
    return 0;
}

static int model_set(struct model *m, const struct fp_route *in, uint32_t n)
{
    if (n > m->max)
        return -ENOSPC;
    for (uint32_t i = 0; i < n; i++)
        if (bad(&in[i]) || !in[i].peer)
            return -EINVAL;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < i; j++)
            if (in[i].prefix == in[j].prefix && in[i].len == in[j].len)
                return -EINVAL;
    m->n = 0;
    for (uint32_t i = 0; i < n; i++)
        m->r[m->n++] = in[i];
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct in in = {data, size};
    static struct model m, before;
    static struct fp_ctx ctx;
    struct fp_ctx *c = &ctx;
    memset(c, 0, sizeof *c);
    m.n = 0;
    m.max = 1 + take(&in, 1) % 64;
    struct tables t = new_tables(m.max);
    /* fp_init wants a ring; the route functions never touch it. */
    static uint8_t slot[128];
    static uint32_t len[1];
    static struct sockaddr_in addr[1];
    static struct iovec iov[1];
    static struct mmsghdr msg[1];
    c->ring = (struct fp_ring){slot, len, addr, iov, msg, 1, sizeof slot, 0};
    c->mtu = 1400;
    c->batch = 1;
    c->max_routes = m.max;
    c->route_cap = t.route_cap, c->peer_cap = t.peer_cap;
    c->routes = t.routes, c->routes_alt = t.routes_alt, c->peers = t.peers, c->peers_alt = t.peers_alt;
    CHECK(fp_init(c) == 0);

    uint64_t gen = 0;
    before = m;
    for (int ops = 0; in.n && ops < 64; ops++) {
        struct fp_route dels[16], adds[16];
        uint32_t op = take(&in, 1) % 6, k, ndel = 0, nadd = 0;
        int rc, want;
        before = m;
        stamp(c, ++gen);
        switch (op) {
        case 0:
            adds[0] = record(&in), nadd = 1;
            rc = fp_add_route(c, adds[0].prefix, adds[0].len, adds[0].peer);
            want = model_update(&m, NULL, 0, adds, 1);
            break;
        case 1:
            dels[0] = record(&in), ndel = 1;
            rc = fp_del_route(c, dels[0].prefix, dels[0].len);
            want = bad(&dels[0]) ? -EINVAL
                   : find(&m, dels[0].prefix, dels[0].len) < 0 ? -ENOENT
                                                               : model_update(&m, dels, 1, NULL, 0);
            break;
        case 2:
            k = take(&in, 1), ndel = k & 15, nadd = (k >> 4) & 7;
            for (uint32_t i = 0; i < ndel; i++)
                dels[i] = record(&in);
            for (uint32_t i = 0; i < nadd; i++)
                adds[i] = record(&in);
            want = model_update(&m, dels, ndel, adds, nadd);
            rc = fp_update_routes(c, dels, ndel, adds, nadd); /* sorts its arguments: after the model */
            break;
        case 3:
            nadd = take(&in, 1) % 17;
            for (uint32_t i = 0; i < nadd; i++)
                adds[i] = record(&in);
            rc = fp_set_routes(c, adds, nadd);
            want = model_set(&m, adds, nadd);
            break;
        case 4: {
            uint32_t max = 1 + take(&in, 1) % 256;
            struct tables fresh = new_tables(max);
            struct fp_ctx old = *c;
            rc = fp_resize(c, fresh.routes, fresh.routes_alt, fresh.peers, fresh.peers_alt, max, fresh.route_cap,
                           fresh.peer_cap);
            want = max < m.n ? -EINVAL : 0;
            if (rc == 0) {
                m.max = max;
                free_tables(&old); /* nothing may point into them now */
            } else {
                struct fp_ctx unused = {.routes = fresh.routes, .routes_alt = fresh.routes_alt,
                                        .peers = fresh.peers, .peers_alt = fresh.peers_alt};
                free_tables(&unused);
            }
            break;
        }
        default:
            k = take(&in, 4);
            check_probe(c, &m, k);
            continue;
        }
        CHECK(rc == want);
        if (rc)
            CHECK(m.n == before.n);
        check(c, &m, &before, gen, 0);
        for (uint32_t i = 0; i < ndel; i++)
            probe_edges(c, &m, &dels[i]);
        for (uint32_t i = 0; i < nadd; i++)
            probe_edges(c, &m, &adds[i]);
    }
    check(c, &m, &before, gen, m.n); /* every route's edges, once */
    free_tables(c);
    return 0;
}
