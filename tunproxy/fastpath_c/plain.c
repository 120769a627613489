/*
 * Both directions, a packet per read or write: routing, the TTL, the ICMP
 * errors due, anti-spoofing on receive, and the drop ring every room drops
 * into.  Offload mode shares the receive loop and the next-hop decision; its
 * own halves are offload_tx.c and offload_rx.c.
 */
#include "internal.h"

/* Count a drop and keep its first bytes in the drop ring (if there is one).
 * Only ever on the drop path: the forwarding path pays nothing for the ring. */
void drop(struct fp_ctx *c, uint64_t *counter, uint32_t reason, uint32_t dir, uint32_t peer,
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

/* A write to the TUN; in offload mode behind a zeroed virtio_net_hdr (no GSO,
 * no checksum help: the kernel checks the packet like any other). */
ssize_t tun_write(const struct fp_ctx *c, int fd, const uint8_t *p, uint32_t len)
{
    static const struct virtio_net_hdr plain;
    if (!(c->offload & FP_OFFLOAD_VNET))
        return write(fd, p, len);
    struct iovec iov[2] = {{(void *)&plain, sizeof plain}, {(void *)p, len}};
    ssize_t n = writev(fd, iov, 2);
    return n < (ssize_t)sizeof plain ? -1 : n - (ssize_t)sizeof plain;
}

void count_batch(uint64_t *batches, uint64_t *multi, uint64_t *max, uint32_t n)
{
    (*batches)++;
    if (n > 1)
        (*multi)++;
    if (n > *max)
        *max = n;
}

/* ---- tun -> udp ---- */

/* Where packet p goes: its peer, or 0 if it is dropped here (counted, and
 * maybe answered with an ICMP error).  seg is the length of the datagrams it
 * will leave as: its own, or a TSO segment's. */
uint32_t next_hop(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot,
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

void count_sent(struct fp_ctx *c, const struct sockaddr_in *a, uint32_t packets, uint64_t bytes)
{
    struct fp_peer *p = peer_find(c->peers, c->peer_cap, ntohl(a->sin_addr.s_addr));
    c->cnt.tx_packets += packets;
    c->cnt.tx_bytes += bytes;
    if (p) {
        p->tx_packets += packets;
        p->tx_bytes += bytes;
    }
}

void send_dropped(struct fp_ctx *c, const struct sockaddr_in *a, const uint8_t *p, uint32_t len,
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

int fp_tun_to_udp(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    c->now_ms = now;
    return c->offload ? tun_to_udp_offload(c, tun_fd, udp_fd, now)
                      : tun_to_udp_plain(c, tun_fd, udp_fd, now);
}

/* ---- udp -> tun ---- */

/* A packet written to the TUN as it is, and counted. */
void rx_write(struct fp_ctx *c, int tun_fd, const uint8_t *p, uint32_t tot, struct fp_peer *peer)
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

/* The drain: the kernel handles a packet written to the TUN within the write,
 * so a reply it makes itself (a TCP ACK, an echo reply) is queued on the TUN
 * by now; reading it at once saves a wake-up per reply.  The FP_REPLY_* rule:
 * read while replies turn up; after FP_REPLY_MISSES calls without one, only
 * the last of each FP_REPLY_PROBE (reply_misses cycles through FP_REPLY_MISSES
 * .. FP_REPLY_MISSES + FP_REPLY_PROBE - 1).  An error (a TUN deleted under us)
 * is a miss: the TUN's own read reports it. */
static void drain_replies(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    uint32_t misses = c->reply_misses, last = FP_REPLY_MISSES + FP_REPLY_PROBE - 1;
    if ((misses < FP_REPLY_MISSES || misses == last) && fp_tun_to_udp(c, tun_fd, udp_fd, now) > 0)
        c->reply_misses = 0;
    else
        c->reply_misses = misses < last ? misses + 1 : FP_REPLY_MISSES;
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
    if (c->features & FP_FEAT_DRAIN)
        drain_replies(c, tun_fd, udp_fd, now);
    return k;
}
