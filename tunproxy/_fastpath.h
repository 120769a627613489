/*
 * tunproxy fast path: the per-packet work of the udp backend.
 *
 * Every byte of memory named here is owned by the caller (Python allocates it
 * once with ffi.new); the C code never allocates, logs or exits.  Functions
 * return a count (>= 0) or -errno.  Addresses and ports are host byte order.
 *
 * This file is both the C header and the cffi cdef: the builder drops the
 * preprocessor lines, so keep everything else plain declarations.
 */
#ifndef TUNPROXY_FASTPATH_H
#define TUNPROXY_FASTPATH_H
#include <stdint.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

enum {
    FP_SCRATCH_SIZE = 128,   /* one ICMP error: 20 + 8 + quoted 60 + 8 = 96 bytes */
    FP_MAX_PACKET = 65535    /* largest IPv4 packet, so the largest slot payload */
};

/* One route: prefix/len -> peer.  The table is kept sorted by
 * ((32 - len) << 32 | prefix), i.e. longest prefixes first. */
struct fp_route {
    uint32_t prefix;
    uint32_t peer;
    uint8_t len;
    uint8_t pad[3];
};

/* A peer (a next hop) and its counters; a slot of an open-addressing hash
 * table keyed by addr, addr 0 meaning empty. */
struct fp_peer {
    uint32_t addr;
    uint32_t pad;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t rx_packets;
    uint64_t rx_bytes;
};

struct fp_counters {
    uint64_t tx_packets;         /* tun -> udp, sent */
    uint64_t tx_bytes;
    uint64_t rx_packets;         /* udp -> tun, written */
    uint64_t rx_bytes;
    uint64_t drop_no_route;
    uint64_t drop_ttl;
    uint64_t drop_malformed;
    uint64_t drop_unknown_peer;
    uint64_t drop_too_big;
    uint64_t drop_tun_write;
    uint64_t drop_send;
    uint64_t icmp_sent;
    uint64_t icmp_ratelimited;
    uint64_t tx_batches;         /* sendmmsg calls that sent >= 1 datagram */
    uint64_t tx_multi_batches;   /* ... that sent > 1 */
    uint64_t tx_max_batch;
    uint64_t rx_batches;         /* recvmmsg calls that returned >= 1 datagram */
    uint64_t rx_multi_batches;
    uint64_t rx_max_batch;
};

/* The packet ring.  Slot i's packet starts at data + i * slot_size + headroom
 * and may be slot_size - headroom (<= FP_MAX_PACKET) bytes long.  The headroom
 * is where a virtio_net_hdr (IFF_VNET_HDR) can later be written in place; a
 * per-slot gso_size array would sit beside len.  addr, iov and msg are the
 * per-slot sendmmsg/recvmmsg arguments, wired up once by fp_init. */
struct fp_ring {
    uint8_t *data;               /* nslots * slot_size bytes */
    uint32_t *len;               /* packet length per slot */
    struct sockaddr_in *addr;    /* tx: destination peer, rx: source */
    struct iovec *iov;
    struct mmsghdr *msg;
    uint32_t nslots;
    uint32_t slot_size;
    uint32_t headroom;
};

struct fp_ctx {
    /* Configuration: filled in by the caller before fp_init. */
    uint32_t mtu;                /* largest inner packet sent with DF */
    uint32_t local_addr;         /* source of the ICMP errors we make */
    uint16_t port;               /* UDP port every peer uses */
    uint16_t pad0;
    uint32_t batch;              /* packets per call, <= ring.nslots */
    uint32_t icmp_rate;          /* ICMP errors per second ... */
    uint32_t icmp_burst;         /* ... and bucket depth */
    uint32_t max_routes;
    uint32_t peer_cap;           /* power of two, >= 2 * max_routes */
    struct fp_ring ring;
    struct fp_route *routes;     /* max_routes entries, the live table */
    struct fp_route *routes_alt; /* max_routes entries, the next table */
    struct fp_peer *peers;       /* peer_cap entries, live */
    struct fp_peer *peers_alt;   /* peer_cap entries, next */
    /* State, owned by the C side. */
    uint32_t nroutes;
    uint32_t pad1;
    uint64_t len_mask;           /* bit n set: some route has length n */
    uint64_t tokens;             /* token bucket, in thousandths of a token */
    uint64_t last_ms;
    struct fp_counters cnt;
    uint8_t scratch[FP_SCRATCH_SIZE];
};

/* Check the configuration, wire up the ring, clear routes and counters. */
int fp_init(struct fp_ctx *c);

/* Replace the whole table in one step (any order; duplicates are -EINVAL). */
int fp_set_routes(struct fp_ctx *c, const struct fp_route *routes, uint32_t n);
/* Add a route or change its peer.  -ENOSPC when full. */
int fp_add_route(struct fp_ctx *c, uint32_t prefix, uint32_t len, uint32_t peer);
/* -ENOENT if there is no such route. */
int fp_del_route(struct fp_ctx *c, uint32_t prefix, uint32_t len);
/* Longest-prefix match: the next hop for dst, or 0 if none. */
uint32_t fp_lookup(const struct fp_ctx *c, uint32_t dst);

/* Move up to batch packets from the TUN fd to the peers; returns the number
 * of packets read from the TUN, or -errno if none was. */
int fp_tun_to_udp(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now_ms);
/* Move up to batch datagrams from the socket to the TUN fd; returns the number
 * of datagrams received, or -errno. */
int fp_udp_to_tun(struct fp_ctx *c, int udp_fd, int tun_fd, uint64_t now_ms);

#endif
