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
 * Memory is all the caller's (see fastpath.h): the ring of slots, the
 * mmsghdr/iovec/sockaddr arrays that point into it, the route and peer
 * tables (and their spares, for growing and whole replacements), the drop
 * ring.  So nothing is allocated per packet and nothing can leak; an error is
 * just a -errno return value.
 *
 * Time comes in as now_ms, so the ICMP token bucket is deterministic in tests.
 *
 * The rooms, each a file: csum.c (checksums, header checks, TTL), icmp.c (the
 * errors we answer with), routes.c (the route and peer tables), setup.c
 * (wiring up the caller's memory, whole-table swaps), plain.c (both
 * directions, one packet per read/write, anti-spoofing, the drop ring),
 * offload_tx.c and offload_rx.c (offload mode's TSO, UDP GSO and GRO).
 * This header is what they share; fastpath.h is what Python sees.
 */
#ifndef TUNPROXY_FASTPATH_INTERNAL_H
#define TUNPROXY_FASTPATH_INTERNAL_H
/* recvmmsg/sendmmsg; every room includes this header first */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fastpath.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/virtio_net.h>
#include <netinet/udp.h>
#include <string.h>
#include <unistd.h>

_Static_assert(sizeof(struct virtio_net_hdr) == FP_VNET_HDR_LEN, "virtio_net_hdr size");
_Static_assert(CMSG_SPACE(sizeof(int)) <= FP_CMSG_WORDS * sizeof(uint64_t), "cmsg space");

enum { TCP_FIN = 0x01, TCP_PSH = 0x08, TCP_CWR = 0x80 };

/* linux/virtio_net.h since 5.18; the build host's headers may be older. */
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5
#endif

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

static inline uint8_t *slot(const struct fp_ring *r, uint32_t i)
{
    return r->data + (size_t)i * r->slot_size + r->headroom;
}

/* ---- peers and routes: the hashing both tables' users need (routes.c) ---- */

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

static inline uint32_t mask_of(uint32_t len) { return len ? 0xffffffffu << (32 - len) : 0; }

static inline int route_bad(uint32_t prefix, uint32_t len)
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

/* What one room calls in another: the module's own business, not exported
 * from the shared object. */
#pragma GCC visibility push(hidden)

/* csum.c */
uint32_t sum16(const uint8_t *p, size_t n, uint32_t sum);
uint32_t sum16_fast(const uint8_t *p, size_t n, uint32_t sum, uint32_t fast);
uint32_t csum_copy(uint8_t *dst, const uint8_t *src, size_t n, uint32_t sum, uint32_t fast);
void csum_finish(uint8_t *p, uint32_t len, uint32_t start, uint32_t off, uint32_t fast);
uint32_t ip_valid(const uint8_t *p, size_t n);
void ttl_dec(uint8_t *p);

/* icmp.c */
uint32_t icmp_error(struct fp_ctx *c, const uint8_t *p, uint32_t tot, uint8_t type, uint8_t code,
                    uint32_t mtu, uint64_t now);
void icmp_to_tun(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot, uint8_t type, uint8_t code,
                 uint32_t mtu, uint64_t now);

/* plain.c */
void drop(struct fp_ctx *c, uint64_t *counter, uint32_t reason, uint32_t dir, uint32_t peer,
          const uint8_t *p, uint32_t len, uint32_t count);
void count_batch(uint64_t *batches, uint64_t *multi, uint64_t *max, uint32_t n);
ssize_t tun_write(const struct fp_ctx *c, int fd, const uint8_t *p, uint32_t len);
uint32_t next_hop(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot, uint32_t seg, uint64_t now);
void count_sent(struct fp_ctx *c, const struct sockaddr_in *a, uint32_t packets, uint64_t bytes);
void send_dropped(struct fp_ctx *c, const struct sockaddr_in *a, const uint8_t *p, uint32_t len,
                  uint32_t count);
void rx_write(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot, struct fp_peer *peer);

/* offload_tx.c */
int tun_to_udp_offload(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now);

/* offload_rx.c */
uint32_t gro_size(struct msghdr *h, uint32_t len);
void gro_add(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, struct fp_peer *peer);
void gro_flush(struct fp_ctx *c, int tun_fd);
int uso_add(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, struct fp_peer *peer);

#pragma GCC visibility pop

/* RFC 1071 internet checksum. */
static inline uint32_t csum(const uint8_t *p, size_t n) { return ~sum16(p, n, 0) & 0xffff; }

/* The TCP/UDP pseudo-header sum of IPv4 packet p for an l4len-byte segment. */
static inline uint32_t pseudo_sum(const uint8_t *p, uint32_t l4len) { return sum16(p + 12, 8, p[9] + l4len); }

#endif
