/*
 * libFuzzer target: packets through the fast path, both directions, plain and
 * offload, under AddressSanitizer and UndefinedBehaviorSanitizer.
 *
 * One input is a configuration (mode and fast-csum, MTU, batch, ICMP bucket, queue sizes,
 * a route table) and then a program of operations run in order on one
 * fp_ctx, so state carries between calls as it does in the daemon (token
 * bucket, peer counters, tables swapped and grown under the ring):
 *
 *   TX      packets written into the TUN, then fp_tun_to_udp
 *   RX      datagrams queued on the "socket", then fp_udp_to_tun
 *   TIME    the clock moves on (ICMP tokens)
 *   ROUTES  fp_update_routes / fp_set_routes
 *   FAULT   the next send system call fails (EAGAIN, EIO, ...) or is short
 *   GROW    fp_resize into fresh tables; the old ones are freed at once, so a
 *           stale pointer is a use-after-free ASan reports
 *
 * The TUN is a real AF_UNIX SOCK_DGRAM socketpair (one read() is one packet,
 * as with IFF_TUN|IFF_NO_PI), so read/write/writev are the real system calls
 * and ASan's interceptors check every buffer handed to them.  The UDP socket
 * is not real: recvmmsg, sendmmsg and sendto are linked to the shims below
 * (ld --wrap), because no socket can be made to deliver a chosen UDP_GRO
 * segment size, MSG_TRUNC or sender address, and sending to the peers the
 * input names would put packets on a real network.  The fast path
 * (tunproxy/fastpath_c/) is compiled unchanged.
 *
 * Packets are built from the input with optional fix-ups (total length,
 * version, IP and TCP/UDP checksums), or almost every mutation would die as
 * "malformed" at the first check and the deeper code (TSO cutting, GRO
 * coalescing, ICMP errors) would never be reached.
 *
 * Beyond the sanitizers, the harness checks what a user would see: every
 * datagram sent is well-formed (address, port, UDP_SEGMENT within the
 * kernel's limits), every packet written to the TUN is a sound IPv4 packet
 * (a TSO write a sound super-packet), a delivered packet's source routes back
 * to a peer that sent in that call unless --allow-any-source, the ICMP errors
 * are what RFC 792 says, and every received packet is accounted for exactly
 * once (delivered or one drop counter).
 */
#define _GNU_SOURCE
#include "fastpath.h"
#include "check.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/virtio_net.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>


enum { NPEERS = 4, MAX_RX = 256, HEADROOM = 64, UDP_FD = 1000 };
static const uint32_t PEERS[NPEERS + 1] = {0xc0000201, 0xc0000202, 0xc0000203, 0xc0000204,
                                           0xc6336401 /* no peer's */};
static const uint32_t LOCAL = 0x0af40000; /* 10.244.0.0 */
static const uint16_t PORT = 8285;

/* ---- reading the input ---- */


static uint32_t get16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t get32(const uint8_t *p) { return get16(p) << 16 | get16(p + 2); }
static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8), p[1] = (uint8_t)v; }

static uint32_t sum16(const uint8_t *p, size_t n, uint32_t s)
{
    for (; n > 1; p += 2, n -= 2)
        s += get16(p);
    if (n)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return s;
}

static int ip_sound(const uint8_t *p, size_t n)
{
    if (n < 20 || p[0] >> 4 != 4)
        return 0;
    size_t ihl = (p[0] & 15) * 4u;
    return ihl >= 20 && ihl <= n && get16(p + 2) == n && sum16(p, ihl, 0) == 0xffff;
}

enum { FIX_LEN = 1, FIX_VERSION = 2, FIX_L4 = 4, FIX_IP = 8, FIX_PARTIAL = 16 };

/* Build a packet of len bytes at o: data from the input, the rest zeros, then
 * the fix-ups asked for. */
static uint32_t build(struct in *in, uint8_t *o, uint32_t room)
{
    uint32_t fix = take(in, 1), len = take(in, 2), want = take(in, 2);
    if (len > room)
        len = room;
    if (want > len)
        want = len;
    if (want > in->n)
        want = (uint32_t)in->n;
    memcpy(o, in->p, want);
    in->p += want, in->n -= want;
    memset(o + want, 0, len - want);
    if (len < 20)
        return len;
    if (fix & FIX_VERSION)
        o[0] = (uint8_t)(0x40 | ((o[0] & 15) < 5 ? 5 : o[0] & 15));
    if (fix & FIX_LEN)
        put16(o + 2, len);
    uint32_t ihl = (o[0] & 15) * 4u, tot = get16(o + 2);
    if (tot > len)
        tot = len;
    if ((fix & (FIX_L4 | FIX_PARTIAL)) && ihl >= 20 && tot >= ihl) {
        uint32_t off = o[9] == 6 ? 16 : o[9] == 17 ? 6 : 0;
        if (off && ihl + off + 2 <= tot) {
            put16(o + ihl + off, 0);
            uint32_t pseudo = sum16(o + 12, 8, o[9] + (tot - ihl));
            if (fix & FIX_PARTIAL)
                put16(o + ihl + off, pseudo);
            else
                put16(o + ihl + off, ~sum16(o + ihl, tot - ihl, pseudo) & 0xffff);
        }
    }
    if ((fix & FIX_IP) && ihl >= 20 && ihl <= len) {
        put16(o + 10, 0);
        put16(o + 10, ~sum16(o, ihl, 0) & 0xffff);
    }
    return len;
}

/* ---- the fake UDP socket ---- */

struct datagram {
    struct sockaddr_in from;
    uint32_t len, gro, junk_cmsg;
    uint8_t *data;
};

static struct {
    struct fp_ctx *c;
    struct datagram rx[MAX_RX];
    uint32_t rx_head, rx_n;
    int fault;                /* errno for the next send call, or -k: send at most k */
    uint64_t sent;            /* datagrams accepted */
    uint8_t copy[FP_MAX_PACKET];
} S;

/* Whether addr is a peer of the live table (some route points at it). */
static int known_peer(uint32_t addr)
{
    for (uint32_t i = 0; i < S.c->peer_cap; i++)
        if (S.c->peers[i].addr == addr)
            return addr != 0;
    return 0;
}

/* One send fault, if armed: 1 and errno set if this call fails. */
static int faulted(void)
{
    if (S.fault > 0) {
        errno = S.fault;
        S.fault = 0;
        return 1;
    }
    return 0;
}

/* any_port: an ICMP error goes back to the port the packet came from. */
static void check_datagram(const struct sockaddr_in *a, socklen_t alen, const void *buf, size_t len,
                           int any_port)
{
    CHECK(alen == sizeof *a && a->sin_family == AF_INET && (any_port || ntohs(a->sin_port) == PORT));
    CHECK(known_peer(ntohl(a->sin_addr.s_addr)));
    CHECK(len <= sizeof S.copy);
    memcpy(S.copy, buf, len); /* ASan: the whole buffer must be ours */
}

int __wrap_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *a, socklen_t alen);
int __wrap_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *a, socklen_t alen)
{
    CHECK(fd == UDP_FD && (flags & MSG_DONTWAIT));
    check_datagram((const struct sockaddr_in *)a, alen, buf, len, 1);
    if (faulted())
        return -1;
    S.sent++;
    return (int)len;
}

int __wrap_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags);
int __wrap_sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
{
    CHECK(fd == UDP_FD && (flags & MSG_DONTWAIT) && n >= 1);
    if (faulted())
        return -1;
    unsigned int k = n;
    if (S.fault < 0) {
        k = (unsigned int)-S.fault < n ? (unsigned int)-S.fault : n;
        S.fault = 0;
        if (k == 0) {
            errno = EAGAIN;
            return -1;
        }
    }
    for (unsigned int i = 0; i < k; i++) {
        struct msghdr *h = &v[i].msg_hdr;
        CHECK(h->msg_iovlen == 1);
        size_t len = h->msg_iov[0].iov_len;
        check_datagram(h->msg_name, h->msg_namelen, h->msg_iov[0].iov_base, len, 0);
        uint32_t segs = 1;
        if (h->msg_controllen) {
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            uint16_t size;
            CHECK(cm && cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_SEGMENT &&
                  cm->cmsg_len == CMSG_LEN(sizeof size));
            memcpy(&size, CMSG_DATA(cm), sizeof size);
            /* The kernel's udp_send_skb limits: EINVAL past them. */
            CHECK(size > 0 && len > size && len <= 65507 && (len + size - 1) / size <= 64);
            CHECK(size <= S.c->mtu);
            segs = (uint32_t)((len + size - 1) / size);
        }
        v[i].msg_len = (unsigned int)len;
        S.sent += segs;
    }
    return (int)k;
}

int __wrap_recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *t);
int __wrap_recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, struct timespec *t)
{
    CHECK(fd == UDP_FD && (flags & MSG_DONTWAIT) && !t && n >= 1);
    unsigned int k = 0;
    for (; k < n && S.rx_head < S.rx_n; k++, S.rx_head++) {
        struct datagram *d = &S.rx[S.rx_head];
        struct msghdr *h = &v[k].msg_hdr;
        CHECK(h->msg_iovlen == 1 && h->msg_name && h->msg_namelen >= sizeof d->from);
        memcpy(h->msg_name, &d->from, sizeof d->from);
        h->msg_namelen = sizeof d->from;
        size_t cap = h->msg_iov[0].iov_len, got = d->len < cap ? d->len : cap;
        memcpy(h->msg_iov[0].iov_base, d->data, got);
        h->msg_flags = d->len > cap ? MSG_TRUNC : 0;
        v[k].msg_len = (unsigned int)got;
        if (d->gro && h->msg_control && h->msg_controllen >= CMSG_SPACE(sizeof(int))) {
            int size = (int)d->gro;
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            cm->cmsg_level = d->junk_cmsg ? SOL_SOCKET : SOL_UDP;
            cm->cmsg_type = UDP_GRO;
            cm->cmsg_len = CMSG_LEN(sizeof size);
            memcpy(CMSG_DATA(cm), &size, sizeof size);
            h->msg_controllen = CMSG_SPACE(sizeof size);
        } else {
            h->msg_controllen = 0;
        }
    }
    if (!k) {
        errno = EAGAIN;
        return -1;
    }
    return (int)k;
}

/* ---- the context ---- */

struct tables {
    struct fp_route *routes, *routes_alt;
    struct fp_peer *peers, *peers_alt;
};

static void *zalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    CHECK(p);
    return p;
}

static struct tables new_tables(uint32_t max_routes)
{
    uint32_t rc = 1, pc = 1;
    while (rc < 2 * max_routes)
        rc <<= 1;
    while (pc < 4 * max_routes)
        pc <<= 1;
    return (struct tables){zalloc(rc * sizeof(struct fp_route)), zalloc(rc * sizeof(struct fp_route)),
                           zalloc(pc * sizeof(struct fp_peer)), zalloc(pc * sizeof(struct fp_peer))};
}

static void free_tables(struct tables t)
{
    free(t.routes), free(t.routes_alt), free(t.peers), free(t.peers_alt);
}

/* The last n bytes of a buffer of max bytes allocated once: allocating
 * megabytes per input costs more than the rest of the run, and at the tail an
 * overrun still lands in ASan's redzone. */
static uint8_t *ring_memory, *out_memory;
static uint8_t *tail(uint8_t **memory, size_t n, size_t max)
{
    CHECK(n <= max);
    if (!*memory)
        *memory = malloc(max);
    CHECK(*memory);
    return *memory + (max - n);
}

static void free_ctx(struct fp_ctx *c)
{
    free(c->ring.len), free(c->ring.addr), free(c->ring.iov), free(c->ring.msg);
    free(c->gso.msg), free(c->gso.iov), free(c->gso.addr), free(c->gso.segs);
    free(c->gso.seg_size), free(c->gso.cmsg), free(c->gso.rx_cmsg), free(c->gso.tun_iov);
    free_tables((struct tables){c->routes, c->routes_alt, c->peers, c->peers_alt});
}

static void read_route(struct in *in, struct fp_route *r, int with_peer)
{
    uint32_t prefix = take(in, 4), len = take(in, 1) % 33;
    r->prefix = len ? prefix & (0xffffffffu << (32 - len)) : 0;
    r->len = (uint8_t)len;
    r->peer = with_peer ? PEERS[take(in, 1) % NPEERS] : 0;
}

/* ---- what comes out ---- */

struct tally {
    uint64_t in;       /* rx: packets that must each end up delivered or dropped */
    uint32_t senders;  /* rx: bit i: PEERS[i] sent in this call */
    int rx;
};

static uint64_t rx_outcomes(const struct fp_counters *k)
{
    return k->rx_packets + k->drop_malformed + k->drop_spoofed + k->drop_ttl + k->drop_tun_write +
           k->drop_unknown_peer + k->drop_too_big;
}

static void check_source(const struct fp_ctx *c, const uint8_t *p, const struct tally *t)
{
    if (c->allow_any_source)
        return;
    uint32_t peer = fp_lookup(c, get32(p + 12));
    int i = 0;
    while (i < NPEERS && PEERS[i] != peer)
        i++;
    CHECK(i < NPEERS && (t->senders >> i & 1));
}

/* Everything the fast path wrote to the TUN since the last drain. */
static void drain(const struct fp_ctx *c, int k_fd, const struct tally *t)
{
    static uint8_t buf[FP_VNET_HDR_LEN + FP_MAX_PACKET + 1];
    int vnet = (c->offload & FP_OFFLOAD_VNET) ? FP_VNET_HDR_LEN : 0;
    for (;;) {
        ssize_t n = recv(k_fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0)
            return;
        CHECK(n >= vnet && n - vnet <= FP_MAX_PACKET);
        const uint8_t *p = buf + vnet;
        size_t len = (size_t)n - vnet;
        struct virtio_net_hdr v = {0};
        memcpy(&v, buf, vnet);
        CHECK(ip_sound(p, len));
        if (v.gso_type == 5 /* VIRTIO_NET_HDR_GSO_UDP_L4 */) {
            /* A coalesced UDP write (USO): only if the TUN took USO; UDP, no options, the UDP
             * length the whole, a partial checksum, at most FP_USO_MAX_SEGS datagrams. */
            CHECK(t->rx && (c->offload & FP_OFFLOAD_USO) && p[0] == 0x45 && p[9] == 17);
            CHECK(v.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM && v.csum_start == 20 && v.csum_offset == 6);
            CHECK(v.hdr_len == 28 && v.gso_size > 0 && v.hdr_len + v.gso_size < len);
            CHECK((len - 28 + v.gso_size - 1) / v.gso_size <= FP_USO_MAX_SEGS);
            CHECK(get16(p + 24) == len - 20 && get16(p + 26) == sum16(p + 12, 8, 17 + (uint32_t)(len - 20)));
        } else if (v.gso_type != VIRTIO_NET_HDR_GSO_NONE) {
            /* A coalesced write: TCP, no options, a partial checksum, segments of gso_size. */
            CHECK(t->rx && v.gso_type == VIRTIO_NET_HDR_GSO_TCPV4 && p[0] == 0x45 && p[9] == 6);
            CHECK(v.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM && v.csum_start == 20 && v.csum_offset == 16);
            CHECK(v.hdr_len == 20 + (p[32] >> 4) * 4u && v.gso_size > 0 && v.hdr_len + v.gso_size < len);
            CHECK((len - v.hdr_len + v.gso_size - 1) / v.gso_size <= FP_GRO_MAX_SEGS);
            CHECK(get16(p + 36) == sum16(p + 12, 8, 6 + (uint32_t)(len - 20)));
        } else {
            CHECK(v.flags == 0 && v.hdr_len == 0 && v.gso_size == 0 && v.csum_start == 0);
        }
        if (t->rx) {
            check_source(c, p, t);
        } else {
            /* tx writes only ICMP errors of ours (RFC 792: header + 8 bytes quoted). */
            CHECK(p[9] == 1 && get32(p + 12) == c->local_addr && p[8] == 64 && p[0] == 0x45);
            CHECK(len >= 28 + 20 && len <= 28 + 68 && sum16(p + 20, len - 20, 0) == 0xffff);
            CHECK(p[20] == 3 || p[20] == 11);
        }
    }
}

/* ---- operations ---- */

static void op_tx(struct fp_ctx *c, struct in *in, int fp_fd, int k_fd, uint64_t now)
{
    static uint8_t pkt[FP_VNET_HDR_LEN + FP_MAX_PACKET];
    uint32_t count = 1 + take(in, 1) % 64, vnet = (c->offload & FP_OFFLOAD_VNET) ? FP_VNET_HDR_LEN : 0;
    uint32_t written = 0;
    for (uint32_t i = 0; i < count && in->n; i++) {
        for (uint32_t j = 0; j < vnet; j++)
            pkt[j] = (uint8_t)take(in, 1);
        uint32_t len = build(in, pkt + vnet, FP_MAX_PACKET);
        if (send(k_fd, pkt, vnet + len, MSG_DONTWAIT) == (ssize_t)(vnet + len))
            written++;
    }
    struct fp_counters before = c->cnt;
    uint64_t sent = S.sent;
    uint32_t reads = 0;
    for (int calls = 0; calls < 64; calls++) {
        uint32_t gso = c->offload & FP_OFFLOAD_UDP_GSO;
        int rc = fp_tun_to_udp(c, fp_fd, UDP_FD, now);
        if (c->gso_errno) { /* said once, by the call that turned UDP GSO off */
            CHECK(gso && !(c->offload & FP_OFFLOAD_UDP_GSO));
            CHECK(c->gso_errno == EIO || c->gso_errno == EINVAL);
            c->gso_errno = 0;
        }
        if (rc < 0) {
            CHECK(rc == -EAGAIN);
            break;
        }
        CHECK(rc >= 1 && (uint32_t)rc <= c->batch);
        reads += (uint32_t)rc;
        CHECK(c->gso.n == 0 && c->gso.used == 0);
    }
    CHECK(reads == written);
    if (!c->offload) {
        const struct fp_counters *k = &c->cnt;
        uint64_t out = (k->tx_packets - before.tx_packets) + (k->drop_send - before.drop_send) +
                       (k->drop_no_route - before.drop_no_route) + (k->drop_ttl - before.drop_ttl) +
                       (k->drop_too_big - before.drop_too_big) + (k->drop_malformed - before.drop_malformed);
        CHECK(out == reads);
    }
    CHECK(c->cnt.tx_packets - before.tx_packets == S.sent - sent);
    struct tally t = {0};
    drain(c, k_fd, &t);
}

static void op_rx(struct fp_ctx *c, struct in *in, int fp_fd, int k_fd, uint64_t now)
{
    static uint8_t pool[MAX_RX * 2048 + 2 * FP_MAX_PACKET];
    uint32_t count = 1 + take(in, 1) % 64, used = 0;
    struct tally t = {.rx = 1};
    uint32_t cap = c->ring.slot_size - c->ring.headroom;
    S.rx_head = S.rx_n = 0;
    for (uint32_t i = 0; i < count && in->n && S.rx_n < MAX_RX; i++) {
        struct datagram *d = &S.rx[S.rx_n++];
        uint32_t who = take(in, 1), gro = take(in, 2), nseg = 1 + take(in, 1) % 8;
        d->from = (struct sockaddr_in){.sin_family = (who & 0x80) ? AF_INET6 : AF_INET,
                                       .sin_port = htons((who & 0x40) ? 4242 : PORT),
                                       .sin_addr.s_addr = htonl(PEERS[(who & 0x3f) % (NPEERS + 1)])};
        d->junk_cmsg = who & 0x20;
        d->gro = c->offload ? gro : 0;
        d->data = pool + used;
        d->len = 0;
        uint32_t room = (uint32_t)sizeof pool - used;
        if (room > FP_MAX_PACKET)
            room = FP_MAX_PACKET;
        for (uint32_t s = 0; s < nseg && in->n; s++) {
            uint32_t start = d->len;
            d->len += build(in, d->data + start, room - start);
            if (!d->gro)
                break;
            if (s + 1 < nseg) {
                /* Every segment but the last is gro bytes long: cut or pad this one. */
                uint32_t end = start + d->gro < room ? start + d->gro : room;
                if (d->len < end)
                    memset(d->data + d->len, 0, end - d->len);
                d->len = end;
            }
        }
        used += d->len;
        /* The packets this datagram stands for, as the fast path will count them. */
        int peer_ok = d->from.sin_family == AF_INET && known_peer(ntohl(d->from.sin_addr.s_addr));
        if (!peer_ok || d->len > cap) {
            t.in += 1;
        } else {
            uint32_t size = (d->gro && !d->junk_cmsg && d->gro < d->len) ? d->gro : d->len;
            t.in += size ? (d->len + size - 1) / size : 1; /* an empty one is one malformed packet */
            t.senders |= 1u << ((who & 0x3f) % (NPEERS + 1));
        }
    }
    struct fp_counters before = c->cnt;
    uint32_t buffers = 0;
    for (int calls = 0; calls < 2 * MAX_RX && S.rx_head < S.rx_n; calls++) {
        int rc = fp_udp_to_tun(c, UDP_FD, fp_fd, now);
        CHECK(rc >= 1 && (uint32_t)rc <= c->batch);
        buffers += (uint32_t)rc;
        CHECK(c->gso.gro_segs == 0);
    }
    CHECK(buffers == S.rx_n && fp_udp_to_tun(c, UDP_FD, fp_fd, now) == -EAGAIN);
    CHECK(rx_outcomes(&c->cnt) - rx_outcomes(&before) == t.in);
    drain(c, k_fd, &t);
}

static void op_routes(struct fp_ctx *c, struct in *in)
{
    struct fp_route del[16], add[16];
    uint32_t kind = take(in, 1), ndel = kind & 15, nadd = (kind >> 4) & 7;
    for (uint32_t i = 0; i < ndel; i++)
        read_route(in, &del[i], 0);
    for (uint32_t i = 0; i < nadd; i++)
        read_route(in, &add[i], 1);
    int rc = (kind & 0x80) && ndel == 0 ? fp_set_routes(c, add, nadd)
                                        : fp_update_routes(c, del, ndel, add, nadd);
    CHECK(rc == 0 || rc == -EINVAL || rc == -ENOSPC);
}

static void op_grow(struct fp_ctx *c, struct tables *live, struct in *in)
{
    /* Grow (or move at the same size), but not without bound: big tables cost page faults, not coverage. */
    uint32_t max = c->max_routes + take(in, 1) % 64;
    if (max > 256)
        max = 256;
    struct tables t = new_tables(max);
    uint32_t rc = 1, pc = 1;
    while (rc < 2 * max)
        rc <<= 1;
    while (pc < 4 * max)
        pc <<= 1;
    CHECK(fp_resize(c, t.routes, t.routes_alt, t.peers, t.peers_alt, max, rc, pc) == 0);
    free_tables(*live);
    *live = t;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct in in = {data, size};
    struct fp_ctx *c = zalloc(sizeof *c);
    uint32_t flags = take(&in, 1);
    c->offload = flags & 1 ? FP_OFFLOAD_VNET | (flags & 2 ? FP_OFFLOAD_UDP_GSO : 0) |
                                 (flags & 32 ? FP_OFFLOAD_USO : 0)
                           : 0;
    c->allow_any_source = (flags >> 2) & 1;
    c->features = (flags & 64 ? FP_FEAT_FAST_CSUM : 0) | (flags & 128 ? FP_FEAT_CSUM_NO_SIMD : 0);
    c->mtu = 68 + take(&in, 2) % (FP_MAX_PACKET - 68 + 1);
    c->local_addr = LOCAL;
    c->port = PORT;
    c->batch = 1 + take(&in, 1) % 64;
    c->icmp_rate = take(&in, 1);
    c->icmp_burst = take(&in, 1);
    uint32_t nroutes = take(&in, 1) % 17, max_routes = 1 + take(&in, 1) % 32;
    struct tables live = new_tables(max_routes);
    c->max_routes = max_routes;
    c->route_cap = c->peer_cap = 1;
    while (c->route_cap < 2 * max_routes)
        c->route_cap <<= 1;
    while (c->peer_cap < 4 * max_routes)
        c->peer_cap <<= 1;
    c->routes = live.routes, c->routes_alt = live.routes_alt;
    c->peers = live.peers, c->peers_alt = live.peers_alt;
    struct fp_ring *r = &c->ring;
    r->nslots = c->batch;
    r->headroom = HEADROOM;
    /* Plain mode may have slots just big enough for the MTU, as the Python side allows. */
    r->slot_size = HEADROOM + (!c->offload && (flags & 16) ? c->mtu : FP_MAX_PACKET);
    r->data = tail(&ring_memory, (size_t)r->nslots * r->slot_size, 64u * (HEADROOM + FP_MAX_PACKET));
    r->len = zalloc(r->nslots * sizeof *r->len);
    r->addr = zalloc(r->nslots * sizeof *r->addr);
    r->iov = zalloc(r->nslots * sizeof *r->iov);
    r->msg = zalloc(r->nslots * sizeof *r->msg);
    if (c->offload) {
        struct fp_gso *g = &c->gso;
        g->nmsg = 1 + take(&in, 1) % 160;
        g->out_size = FP_MAX_PACKET + take(&in, 2) * 16;
        g->out = tail(&out_memory, g->out_size, FP_MAX_PACKET + 0xffffu * 16);
        g->msg = zalloc(g->nmsg * sizeof *g->msg);
        g->iov = zalloc(g->nmsg * sizeof *g->iov);
        g->addr = zalloc(g->nmsg * sizeof *g->addr);
        g->segs = zalloc(g->nmsg * sizeof *g->segs);
        g->seg_size = zalloc(g->nmsg * sizeof *g->seg_size);
        g->cmsg = zalloc(g->nmsg * FP_CMSG_WORDS * sizeof *g->cmsg);
        g->rx_cmsg = zalloc(r->nslots * FP_CMSG_WORDS * sizeof *g->rx_cmsg);
        g->tun_iov = zalloc((FP_GRO_MAX_SEGS + 1) * sizeof *g->tun_iov);
    }
    CHECK(fp_init(c) == 0);
    S.c = c;
    S.fault = 0;
    S.sent = 0;

    struct fp_route routes[16];
    for (uint32_t i = 0; i < nroutes; i++)
        read_route(&in, &routes[i], 1);
    int rc = fp_set_routes(c, routes, nroutes);
    CHECK(rc == 0 || rc == -EINVAL || rc == -ENOSPC);

    /* The TUN: made once (each input drains what it wrote), its buffer per input. */
    static int sp[2] = {-1, -1};
    int big = 8 << 20, small = (flags & 8) ? 4096 : big;
    if (sp[0] < 0) {
        CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) == 0);
        setsockopt(sp[1], SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
        setsockopt(sp[1], SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    }
    setsockopt(sp[0], SOL_SOCKET, SO_SNDBUFFORCE, &small, sizeof small);

    uint64_t now = 0;
    for (int ops = 0; in.n && ops < 64; ops++) {
        switch (take(&in, 1) % 6) {
        case 0: op_tx(c, &in, sp[0], sp[1], now); break;
        case 1: op_rx(c, &in, sp[0], sp[1], now); break;
        case 2: now += take(&in, 2); break;
        case 3: op_routes(c, &in); break;
        case 4: {
            uint32_t f = take(&in, 1);
            static const int errs[] = {EAGAIN, ENOBUFS, EIO, EINVAL, EPERM, EMSGSIZE, ECONNREFUSED, EINTR};
            S.fault = f & 0x80 ? -(int)(f & 0x3f) : errs[f % 8];
            break;
        }
        case 5: op_grow(c, &live, &in); break;
        }
    }
    if (getenv("FUZZ_VERBOSE")) {
        /* What an input did, for checking that a seed reaches what it is meant to. */
        const struct fp_counters *k = &c->cnt;
        fprintf(stderr,
                "tx %lu rx %lu no_route %lu ttl %lu malformed %lu unknown_peer %lu too_big %lu tun_write %lu "
                "send %lu spoofed %lu icmp %lu tso %lu/%lu csum %lu gso %lu/%lu gro %lu/%lu tun_gso %lu/%lu\n",
                k->tx_packets, k->rx_packets, k->drop_no_route, k->drop_ttl, k->drop_malformed,
                k->drop_unknown_peer, k->drop_too_big, k->drop_tun_write, k->drop_send, k->drop_spoofed,
                k->icmp_sent, k->tso_packets, k->tso_segments, k->csum_completed, k->gso_sends, k->gso_segments,
                k->gro_receives, k->gro_segments, k->tun_gso_writes, k->tun_gso_segments);
    }
    CHECK(recv(sp[0], S.copy, 1, MSG_DONTWAIT) < 0 && recv(sp[1], S.copy, 1, MSG_DONTWAIT) < 0);
    free_ctx(c); /* c's four tables are live's, maybe swapped */
    free(c);
    return 0;
}
