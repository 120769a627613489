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
    FP_MAX_PACKET = 65535,   /* largest IPv4 packet, so the largest slot payload */
    FP_VNET_HDR_LEN = 10,    /* sizeof(struct virtio_net_hdr), before each TUN packet */
    FP_GSO_MAX_SEGS = 64,    /* datagrams per UDP_SEGMENT send (the kernel's limit is >= 64) */
    FP_GSO_MAX_BYTES = 65507,/* UDP payload per send: 65535 - 20 (IPv4) - 8 (UDP) */
    FP_CMSG_WORDS = 4,       /* uint64_t per message for one int-sized cmsg (CMSG_SPACE) */
    FP_GRO_MAX_SEGS = 128,   /* TCP segments coalesced into one TUN write, at most */
    FP_USO_MAX_SEGS = 64,    /* UDP datagrams coalesced into one TUN write, at most: UDP_MAX_SEGMENTS,
                                which virtio_net_hdr_to_skb enforces (64; later kernels raised it) */
    FP_DROP_SNAP = 96        /* bytes of a dropped packet kept in the drop ring */
};

/* Why a packet was dropped: the order of the drop_* counters in fp_counters. */
enum {
    FP_DROP_NO_ROUTE = 0,
    FP_DROP_TTL = 1,
    FP_DROP_MALFORMED = 2,
    FP_DROP_UNKNOWN_PEER = 3,
    FP_DROP_TOO_BIG = 4,
    FP_DROP_TUN_WRITE = 5,
    FP_DROP_SEND = 6,
    FP_DROP_SPOOFED = 7
};

/* Which way a dropped packet was going. */
enum {
    FP_DIR_TX = 0,           /* read from the TUN, for a peer */
    FP_DIR_RX = 1            /* received from the socket, for the TUN */
};

/* fp_ctx.offload bits, chosen at init. */
enum {
    FP_OFFLOAD_VNET = 1,     /* the TUN has IFF_VNET_HDR with TSO4/CSUM offloads on */
    FP_OFFLOAD_UDP_GSO = 2,  /* send trains of datagrams with UDP_SEGMENT; cleared on refusal */
    FP_OFFLOAD_USO = 4       /* the TUN took TUN_F_USO4|TUN_F_USO6: it hands over UDP trains
                                (VIRTIO_NET_HDR_GSO_UDP_L4) and takes coalesced ones */
};

/* fp_ctx.features bits: speed-ups that change no byte on the wire, chosen at
 * init (tunproxy turns each on unless told --without NAME). */
enum {
    FP_FEAT_FAST_CSUM = 1,    /* "fast-csum" (offload mode): AVX2 sum16 if the CPU has it,
                                 fused copy-and-sum */
    FP_FEAT_CSUM_NO_SIMD = 2, /* fast-csum as on a CPU without AVX2: the portable code (--refuse) */
    FP_FEAT_DRAIN = 4         /* "drain": fp_udp_to_tun reads the TUN after its writes for the
                                 replies the kernel made in them (ACKs, echo replies) and sends
                                 them, by the rule below */
};

/* The drain's rule: read while replies turn up; after FP_REPLY_MISSES calls in
 * a row that found none (the peer is an application, which answers later, not
 * the kernel), read only once in FP_REPLY_PROBE calls, to notice when replies
 * come back.  fp_ctx.reply_misses counts them. */
enum { FP_REPLY_MISSES = 4, FP_REPLY_PROBE = 64 };

/* One route: prefix/len -> peer; a slot of an open-addressing hash table
 * keyed by (prefix, len), peer 0 meaning empty. */
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
    uint32_t refs;               /* routes pointing at this peer */
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t rx_packets;
    uint64_t rx_bytes;
};

/* One dropped packet in the drop ring: written only on the drop path, into
 * memory the caller owns, overwriting the oldest. */
struct fp_drop {
    uint64_t time_ms;            /* now_ms of the fp_* call that dropped it */
    uint32_t peer;               /* tx: the next hop (0: none); rx: the sender */
    uint32_t len;                /* the packet's length; data holds min(len, FP_DROP_SNAP) */
    uint8_t reason;              /* FP_DROP_* */
    uint8_t dir;                 /* FP_DIR_* */
    uint16_t count;              /* packets it stands for (a refused train of datagrams) */
    uint32_t pad;
    uint8_t data[FP_DROP_SNAP];  /* the packet's first bytes, from its IPv4 header */
};

/* The counters, each only ever growing (the batch maxima: the largest yet).
 * These fields are the one list of them: Python takes the names from this
 * struct (cffi's typeof(...).fields), tunproxy/counters.py says what each
 * means, and a unit test holds the two to the same names in the same order.
 * The drop_* ones are in FP_DROP_* order. */
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
    uint64_t drop_spoofed;       /* inner source routed to another peer, or to none */
    uint64_t icmp_sent;
    uint64_t icmp_ratelimited;
    uint64_t tx_batches;         /* sendmmsg calls that sent >= 1 datagram */
    uint64_t tx_multi_batches;   /* ... that sent > 1 */
    uint64_t tx_max_batch;
    uint64_t rx_batches;         /* recvmmsg calls that returned >= 1 datagram */
    uint64_t rx_multi_batches;
    uint64_t rx_max_batch;
    /* Offload mode only. */
    uint64_t tso_packets;        /* TSO super-packets read from the TUN ... */
    uint64_t tso_segments;       /* ... and the packets they were split into */
    uint64_t csum_completed;     /* partial checksums of other packets completed */
    uint64_t gso_sends;          /* datagram trains sent as one UDP_SEGMENT message ... */
    uint64_t gso_segments;       /* ... and the datagrams in them */
    uint64_t gro_receives;       /* received buffers holding several datagrams (UDP_GRO) ... */
    uint64_t gro_segments;       /* ... and the datagrams in them */
    uint64_t tun_gso_writes;     /* TUN writes of several coalesced TCP segments ... */
    uint64_t tun_gso_segments;   /* ... and the segments in them */
    uint64_t uso_packets;        /* UDP trains (USO) read from the TUN ... */
    uint64_t uso_segments;       /* ... and the datagrams they were split into */
    uint64_t tun_uso_writes;     /* TUN writes of several coalesced UDP datagrams (USO) ... */
    uint64_t tun_uso_segments;   /* ... and the datagrams in them */
};

/* The packet ring.  Slot i's packet starts at data + i * slot_size + headroom
 * and may be slot_size - headroom (<= FP_MAX_PACKET) bytes long.  In offload
 * mode a TUN read puts its virtio_net_hdr in the headroom.  addr, iov and msg
 * are the per-slot sendmmsg/recvmmsg arguments, wired up once by fp_init. */
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

/* Offload mode only: the send queue, the cmsg space of both directions, and
 * the TCP segments being coalesced into one TUN write.
 * Every outgoing datagram is copied into out, back to back; message i is
 * iov[i], a run of segs[i] datagrams of seg_size[i] bytes (the last one may be
 * shorter) to addr[i], sent with a UDP_SEGMENT cmsg when it holds more than
 * one.  A full queue is flushed with one sendmmsg.
 * tun_iov[1..] point into the ring at the segments being coalesced (the first
 * whole, then only payloads); tun_iov[0] is for the virtio_net_hdr. */
struct fp_gso {
    uint8_t *out;                /* out_size bytes */
    struct mmsghdr *msg;         /* nmsg of each of these five */
    struct iovec *iov;
    struct sockaddr_in *addr;
    uint32_t *segs;
    uint32_t *seg_size;
    uint64_t *cmsg;              /* nmsg * FP_CMSG_WORDS: UDP_SEGMENT */
    uint64_t *rx_cmsg;           /* ring.nslots * FP_CMSG_WORDS: UDP_GRO */
    struct iovec *tun_iov;       /* FP_GRO_MAX_SEGS + 1 */
    uint32_t out_size;           /* >= FP_MAX_PACKET */
    uint32_t nmsg;
    /* State, owned by the C side. */
    uint32_t n;                  /* messages queued */
    uint32_t used;               /* bytes of out queued */
    struct fp_peer *gro_peer;    /* coalescing: where the segments came from */
    uint32_t gro_segs;           /* segments so far (0: none) */
    uint32_t gro_len;            /* IP total length of the super-packet */
    uint32_t gro_bytes;          /* the segments' own lengths, summed */
    uint32_t gro_mss;            /* payload bytes of the first segment */
    uint32_t gro_seq;            /* the sequence number a next segment must have */
    uint32_t gro_closed;         /* a short or PSH segment ended it */
    uint32_t gro_proto;          /* IPPROTO_TCP or, with FP_OFFLOAD_USO, IPPROTO_UDP */
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
    uint32_t route_cap;          /* power of two, >= 2 * max_routes */
    uint32_t peer_cap;           /* power of two, >= 4 * max_routes */
    uint32_t offload;            /* FP_OFFLOAD_* bits */
    int32_t gso_errno;           /* set by the call in which the kernel refused UDP_SEGMENT
                                    (EIO, EINVAL), clearing FP_OFFLOAD_UDP_GSO; 0 again is
                                    the caller's to write */
    uint32_t allow_any_source;   /* 0: a peer's packet must come from that peer's subnets */
    struct fp_ring ring;
    struct fp_gso gso;           /* offload mode only */
    struct fp_route *routes;     /* route_cap slots, the live table */
    struct fp_route *routes_alt; /* route_cap slots, where set_routes builds the next one */
    struct fp_peer *peers;       /* peer_cap entries, live */
    struct fp_peer *peers_alt;   /* peer_cap entries, next */
    struct fp_drop *drops;       /* ndrops entries: the drop ring (may be NULL if ndrops is 0) */
    uint32_t ndrops;
    uint32_t features;           /* FP_FEAT_* bits, chosen at init */
    /* State, owned by the C side. */
    uint64_t drops_total;        /* records ever written; the next goes to drops_total % ndrops */
    uint64_t now_ms;             /* now_ms of the current fp_tun_to_udp/fp_udp_to_tun call */
    uint32_t nroutes;
    uint32_t reply_misses;       /* the drain's calls in a row without a reply (see FP_REPLY_*) */
    uint64_t len_mask;           /* bit n set: some route has length n */
    uint32_t len_count[33];      /* routes of each length */
    uint32_t pad3;
    uint64_t tokens;             /* token bucket, in thousandths of a token */
    uint64_t last_ms;
    struct fp_counters cnt;
    uint8_t scratch[FP_SCRATCH_SIZE];
};

/* Check the configuration, wire up the ring, clear routes and counters. */
int fp_init(struct fp_ctx *c);

/* Replace the whole table in one step, O(table) (any order; duplicates are -EINVAL). */
int fp_set_routes(struct fp_ctx *c, const struct fp_route *routes, uint32_t n);
/* Add a route or change its peer, O(1).  -ENOSPC when full. */
int fp_add_route(struct fp_ctx *c, uint32_t prefix, uint32_t len, uint32_t peer);
/* -ENOENT if there is no such route. */
int fp_del_route(struct fp_ctx *c, uint32_t prefix, uint32_t len);
/* Remove del[0..ndel) and add or repoint add[0..nadd) as one change,
 * removals first, in O(batch log batch) whatever the table size.  Both arrays
 * are sorted in place.  Removing an absent route is not an error.  -EINVAL for a bad
 * route or an add repeated; -ENOSPC if the result exceeds max_routes; either
 * way the live table is unchanged. */
int fp_update_routes(struct fp_ctx *c, struct fp_route *del, uint32_t ndel, struct fp_route *add,
                     uint32_t nadd);
/* Move the live routes and peer counters into larger caller-owned tables
 * (routes/routes_alt: route_cap slots, a power of two >= 2 * max_routes;
 * peers/peers_alt: peer_cap, a power of two >= 4 * max_routes) and use them
 * from now on.  -EINVAL if they would not hold the live table. */
int fp_resize(struct fp_ctx *c, struct fp_route *routes, struct fp_route *routes_alt, struct fp_peer *peers,
              struct fp_peer *peers_alt, uint32_t max_routes, uint32_t route_cap, uint32_t peer_cap);
/* Longest-prefix match: the next hop for dst, or 0 if none. */
uint32_t fp_lookup(const struct fp_ctx *c, uint32_t dst);

/* Move up to batch packets from the TUN fd to the peers; returns the number
 * of packets read from the TUN, or -errno if none was.  In offload mode a
 * TSO packet counts as one.  If the kernel refused UDP_SEGMENT in this call,
 * the datagrams were sent one by one and gso_errno says why. */
int fp_tun_to_udp(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now_ms);
/* Move up to batch datagrams from the socket to the TUN fd; returns the number
 * of receive buffers filled (a UDP_GRO buffer may hold many datagrams), or
 * -errno.  With FP_FEAT_DRAIN, then one fp_tun_to_udp for the replies (by the
 * FP_REPLY_* rule); its errors are left for the TUN's own read to meet, and
 * gso_errno is set as there. */
int fp_udp_to_tun(struct fp_ctx *c, int udp_fd, int tun_fd, uint64_t now_ms);

/* What fp_run returns, besides -errno. */
enum {
    FP_RUN_STOP = 0,        /* stop_fd was readable (it is not read) */
    FP_RUN_YIELD = 1,       /* yield_fd was readable (read, so it is not) */
    FP_RUN_GSO_REFUSED = 2, /* the kernel refused UDP_SEGMENT: gso_errno says why */
    FP_RUN_TUN_GONE = 3,    /* the TUN fd says EBADFD: its device was deleted */
};
/* Forward in both directions until told to stop: epoll_wait on epfd (which
 * the caller has set up to watch tun_fd, udp_fd, stop_fd and yield_fd for
 * EPOLLIN, with data.fd set to each fd), then fp_tun_to_udp or fp_udp_to_tun
 * for whichever is ready. Returns an FP_RUN_* code, or -errno from epoll_wait
 * or from a call (after which the caller may call fp_run again). */
int fp_run(struct fp_ctx *c, int epfd, int tun_fd, int udp_fd, int stop_fd, int yield_fd);

/* The checksum code, for tests: sum16 (RFC 1071, folded, not complemented) of
 * p[0..n) plus sum, by the code the FP_FEAT_* bits in fast pick (0: the
 * scalar one); the same while copying src to dst; whether this CPU has AVX2
 * (so FP_FEAT_FAST_CSUM uses it). */
uint32_t fp_sum16(const uint8_t *p, size_t n, uint32_t sum, uint32_t fast);
uint32_t fp_csum_copy(uint8_t *dst, const uint8_t *src, size_t n, uint32_t sum, uint32_t fast);
int fp_have_avx2(void);

#endif
