/*
 * Per-packet route lookup cost of the fast path's table (fp_lookup), for
 * several table sizes in one process, compiled with the extension's flags.
 * Driven by bench/lookup.py, which passes the table geometry the Python
 * side would choose; see there for what is measured and why.
 *
 *   lookup ROUNDS LOOKUPS PATTERN N:ROUTE_CAP:PEER_CAP ...
 *
 * PATTERN: "spread" (destinations cycle over every route's subnet) or
 * "flows" (8 destinations, as a few busy flows are).  Rounds alternate
 * between the tables, so drift in the machine's load hits all of them alike.
 * Prints one JSON object: per table, the nanoseconds per lookup of each round.
 */
#define _GNU_SOURCE
#include "fastpath.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { NDST = 4096, MAX_TABLES = 8 };

struct table {
    struct fp_ctx c;
    uint32_t n, dst[NDST];
};

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void *alloc(size_t n)
{
    void *p = calloc(1, n);
    if (!p) {
        fprintf(stderr, "lookup: out of memory\n");
        exit(1);
    }
    return p;
}

/* Subnet i is 10.(i / 256).(i % 256).0/24, leased by host 198.18.(i / 256).(i % 256 + 1). */
static int setup(struct table *t, uint32_t n, uint32_t route_cap, uint32_t peer_cap, int flows)
{
    static uint8_t slot[128];
    static uint32_t len[1];
    static struct sockaddr_in addr[1];
    static struct iovec iov[1];
    static struct mmsghdr msg[1];
    struct fp_ctx *c = &t->c;
    c->ring = (struct fp_ring){slot, len, addr, iov, msg, 1, sizeof slot, 0};
    c->mtu = 1400;
    c->batch = 1;
    c->max_routes = route_cap / 2;
    c->route_cap = route_cap;
    c->peer_cap = peer_cap;
    c->routes = alloc(route_cap * sizeof *c->routes);
    c->routes_alt = alloc(route_cap * sizeof *c->routes_alt);
    c->peers = alloc(peer_cap * sizeof *c->peers);
    c->peers_alt = alloc(peer_cap * sizeof *c->peers_alt);
    if (fp_init(c) < 0)
        return -1;
    struct fp_route *r = alloc(n * sizeof *r);
    for (uint32_t i = 0; i < n; i++)
        r[i] = (struct fp_route){.prefix = 0x0a000000 | i << 8, .len = 24, .peer = 0xc6120001 + i};
    int rc = fp_set_routes(c, r, n);
    free(r);
    if (rc < 0)
        return rc;
    t->n = n;
    srand(42);
    for (uint32_t i = 0; i < NDST; i++) {
        uint32_t subnet = flows ? (i % 8) * (n / 8 ? n / 8 : 1) % n : i % n;
        t->dst[i] = 0x0a000000 | subnet << 8 | (uint32_t)(1 + rand() % 254);
    }
    /* Shuffle, so the spread pattern walks the table in no useful order. */
    for (uint32_t i = NDST - 1; i > 0; i--) {
        uint32_t j = (uint32_t)rand() % (i + 1), x = t->dst[i];
        t->dst[i] = t->dst[j], t->dst[j] = x;
    }
    for (uint32_t i = 0; i < NDST; i++)
        if (fp_lookup(c, t->dst[i]) == 0)
            return -2; /* every destination is routed */
    return 0;
}

static double measure(const struct table *t, long lookups, uint32_t *sink)
{
    uint32_t acc = 0;
    double start = now_ns();
    for (long i = 0; i < lookups; i++)
        acc += fp_lookup(&t->c, t->dst[i & (NDST - 1)]);
    double took = now_ns() - start;
    *sink += acc;
    return took / (double)lookups;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: lookup ROUNDS LOOKUPS spread|flows N:ROUTE_CAP:PEER_CAP ...\n");
        return 2;
    }
    int rounds = atoi(argv[1]), flows = !strcmp(argv[3], "flows"), ntables = argc - 4;
    long lookups = atol(argv[2]);
    static struct table tables[MAX_TABLES];
    if (rounds < 1 || lookups < 1 || ntables > MAX_TABLES) {
        fprintf(stderr, "lookup: bad arguments\n");
        return 2;
    }
    for (int k = 0; k < ntables; k++) {
        unsigned n, rcap, pcap;
        if (sscanf(argv[4 + k], "%u:%u:%u", &n, &rcap, &pcap) != 3 || setup(&tables[k], n, rcap, pcap, flows)) {
            fprintf(stderr, "lookup: cannot build table %s\n", argv[4 + k]);
            return 2;
        }
    }
    static double ns[MAX_TABLES][1000];
    uint32_t sink = 0;
    for (int k = 0; k < ntables; k++)
        measure(&tables[k], lookups / 4, &sink); /* warm up */
    /* Each round measures every table, starting with a different one. */
    for (int r = 0; r < rounds && r < 1000; r++)
        for (int k = 0; k < ntables; k++) {
            int j = (k + r) % ntables;
            ns[j][r] = measure(&tables[j], lookups, &sink);
        }
    printf("{\"pattern\": \"%s\", \"sink\": %u, \"tables\": [", argv[3], sink);
    for (int k = 0; k < ntables; k++) {
        printf("%s{\"routes\": %u, \"route_cap\": %u, \"peer_cap\": %u, \"ns_per_lookup\": [", k ? ", " : "",
               tables[k].n, tables[k].c.route_cap, tables[k].c.peer_cap);
        for (int r = 0; r < rounds && r < 1000; r++)
            printf("%s%.3f", r ? ", " : "", ns[k][r]);
        printf("]}");
    }
    printf("]}\n");
    return 0;
}
