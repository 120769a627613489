/*
 * Offload mode, udp -> tun (the why of offload mode is in offload_tx.c):
 *
 *  - With UDP_GRO on the socket the kernel hands such runs over whole; a cmsg
 *    gives the datagram size, and we walk the buffer one datagram at a time.
 *  - On the way into the TUN, a run of one flow's TCP segments becomes one
 *    write again: a TSO packet (writev of the first segment and the others'
 *    payloads, so nothing is copied) that the kernel's TCP takes whole, as
 *    it would from GRO.  This undoes our own cutting exactly, so the rules are
 *    the kernel's GRO rules (see gro_follows), and a segment whose checksum
 *    is wrong is never merged: the kernel does not check a merged one again.
 *  - With USO on the TUN (FP_OFFLOAD_USO), a run of one flow's UDP datagrams
 *    (same addresses and ports, the same payload size but for a shorter
 *    last one) becomes one VIRTIO_NET_HDR_GSO_UDP_L4 write, as wireguard-go's
 *    UDP GRO makes it; IP IDs need not follow (the kernel's UDP GRO does not
 *    ask that either).  Each datagram's checksum is checked first, for the
 *    same reason as a TCP segment's, so one without a checksum (0) is never
 *    merged.
 *    Anything else is written alone behind a zeroed virtio_net_hdr, and the
 *    kernel checks it as it would anyone's packet.
 */
#include "internal.h"

/* The datagram size of a UDP_GRO buffer of len bytes (len if it holds one). */
uint32_t gro_size(struct msghdr *h, uint32_t len)
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

/* The virtio_net_hdr of a coalesced UDP write, its first datagram's headers
 * made the train's as wireguard-go makes them: total length, IP header
 * checksum, UDP length of the whole, and the UDP checksum left partial (the
 * pseudo-header sum), which the kernel completes per datagram if it cuts the
 * train (__udp_gso_segment) and trusts if it delivers it whole. */
static struct virtio_net_hdr uso_header(const struct fp_gso *g, uint8_t *h)
{
    put16(h + 2, g->gro_len);
    put16(h + 10, 0);
    put16(h + 10, csum(h, 20));
    put16(h + 24, g->gro_len - 20);
    put16(h + 26, pseudo_sum(h, g->gro_len - 20));
    return (struct virtio_net_hdr){
        .flags = VIRTIO_NET_HDR_F_NEEDS_CSUM,
        .gso_type = VIRTIO_NET_HDR_GSO_UDP_L4,
        .hdr_len = 28,
        .gso_size = (uint16_t)g->gro_mss,
        .csum_start = 20,
        .csum_offset = 6,
    };
}

/* Write the coalesced segments, if any: one segment as it is, several as one
 * TSO super-packet (or USO train: uso_header).  Its first segment's headers
 * become the super-packet's:
 * total length and header checksum redone, PSH if the last had it, and the
 * TCP checksum left partial (the pseudo-header sum, VIRTIO_NET_HDR_F_NEEDS_CSUM)
 * as a TSO sender hands it over: the kernel fills it in if it ever cuts the
 * packet up again, and trusts it if it delivers the packet locally, which is
 * why gro_add checked every segment's checksum. */
void gro_flush(struct fp_ctx *c, int tun_fd)
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
    struct virtio_net_hdr v;
    if (g->gro_proto == IPPROTO_UDP) {
        v = uso_header(g, h);
    } else {
        uint32_t hlen = 20 + (h[32] >> 4) * 4u;
        v = (struct virtio_net_hdr){
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
    }
    g->tun_iov[0] = (struct iovec){.iov_base = &v, .iov_len = sizeof v};
    if (writev(tun_fd, g->tun_iov, (int)n + 1) != (ssize_t)(sizeof v + g->gro_len)) {
        drop(c, &c->cnt.drop_tun_write, FP_DROP_TUN_WRITE, FP_DIR_RX, g->gro_peer->addr, h,
             (uint32_t)g->tun_iov[1].iov_len, n);
        return;
    }
    if (g->gro_proto == IPPROTO_UDP) {
        c->cnt.tun_uso_writes++;
        c->cnt.tun_uso_segments += n;
    } else {
        c->cnt.tun_gso_writes++;
        c->cnt.tun_gso_segments += n;
    }
    c->cnt.rx_packets += n;
    c->cnt.rx_bytes += g->gro_bytes;
    g->gro_peer->rx_packets += n;
    g->gro_peer->rx_bytes += g->gro_bytes;
}

/* Whether p (tot bytes, TTL already decremented) is a TCP segment we may
 * coalesce: no IP options or fragments, ACK with at most PSH, some payload,
 * and a correct checksum, since the kernel will not check it again. */
static int gro_candidate(const uint8_t *p, uint32_t tot, uint32_t fast)
{
    if (p[0] != 0x45 || p[9] != 6 || (get16(p + 6) & 0x3fff) || tot < 40)
        return 0;
    uint32_t hlen = 20 + (p[32] >> 4) * 4u;
    return hlen >= 40 && hlen < tot && (p[33] & ~TCP_PSH) == 0x10 &&
           sum16_fast(p + 20, tot - 20, pseudo_sum(p, tot - 20), fast) == 0xffff;
}

/* Whether candidate p continues the coalesced segments, as the kernel's GRO
 * would have it: the same headers but for the length, checksums and PSH; the
 * next IP ID and sequence number; no more payload than the first. */
static int gro_follows(const struct fp_gso *g, const uint8_t *p, uint32_t tot,
                       const struct fp_peer *peer)
{
    const uint8_t *h = g->tun_iov[1].iov_base;
    uint32_t hlen = 20 + (h[32] >> 4) * 4u;
    return peer == g->gro_peer && g->gro_proto == IPPROTO_TCP && !g->gro_closed &&
           g->gro_segs < FP_GRO_MAX_SEGS &&
           tot - hlen <= g->gro_mss && g->gro_len + (tot - hlen) <= FP_MAX_PACKET &&
           get16(p + 4) == ((get16(h + 4) + g->gro_segs) & 0xffff) && get32(p + 24) == g->gro_seq &&
           !memcmp(p, h, 2) && !memcmp(p + 6, h + 6, 4) && !memcmp(p + 12, h + 12, 12) &&
           !memcmp(p + 28, h + 28, 5) && (p[33] & ~TCP_PSH) == h[33] &&
           !memcmp(p + 34, h + 34, 2) && !memcmp(p + 38, h + 38, hlen - 38);
}

/* Take p (tot bytes, payload of them after its headers) into the coalesced
 * run: after its last segment if it continues it, else as the first of a new
 * run, once what was pending is written. */
static void gro_take(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, uint32_t payload,
                     struct fp_peer *peer, uint8_t proto, int follows)
{
    struct fp_gso *g = &c->gso;
    if (follows) {
        g->tun_iov[++g->gro_segs] = (struct iovec){.iov_base = p + (tot - payload), .iov_len = payload};
        g->gro_len += payload;
        g->gro_bytes += tot;
        return;
    }
    gro_flush(c, tun_fd);
    g->tun_iov[1] = (struct iovec){.iov_base = p, .iov_len = tot};
    g->gro_segs = 1;
    g->gro_len = g->gro_bytes = tot;
    g->gro_mss = payload;
    g->gro_peer = peer;
    g->gro_proto = proto;
}

/* Offload mode's TUN write: coalesce runs of one flow's TCP segments into
 * one write (the kernel's TCP then takes 64 KiB at a time, not 1.4); write
 * anything else as it is, after what was pending, so the order holds. */
void gro_add(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, struct fp_peer *peer)
{
    struct fp_gso *g = &c->gso;
    if (uso_add(c, tun_fd, p, tot, peer))
        return;
    if (!gro_candidate(p, tot, c->features)) {
        gro_flush(c, tun_fd);
        rx_write(c, tun_fd, p, tot, peer);
        return;
    }
    uint32_t hlen = 20 + (p[32] >> 4) * 4u, payload = tot - hlen;
    int follows = g->gro_segs && gro_follows(g, p, tot, peer);
    gro_take(c, tun_fd, p, tot, payload, peer, IPPROTO_TCP, follows);
    if (follows)
        ((uint8_t *)g->tun_iov[1].iov_base)[33] |= p[33] & TCP_PSH;
    g->gro_seq = get32(p + 24) + payload;
    g->gro_closed = payload < g->gro_mss || (p[33] & TCP_PSH);
}

/* Whether p (tot bytes, TTL already decremented) is a UDP datagram we may
 * coalesce: no IP options or fragments, some payload, a UDP length that is
 * the packet's (no padding the train would carry along) and a checksum that
 * is there and correct, since the kernel will not check a merged one. */
static int uso_candidate(const uint8_t *p, uint32_t tot)
{
    return p[0] == 0x45 && p[9] == IPPROTO_UDP && !(get16(p + 6) & 0x3fff) && tot > 28 &&
           get16(p + 24) == tot - 20 && get16(p + 26) &&
           sum16(p + 20, tot - 20, pseudo_sum(p, tot - 20)) == 0xffff;
}

/* Whether candidate p continues the coalesced datagrams, as wireguard-go's
 * udpPacketsCanCoalesce has it: the same IP header but for the length, ID and
 * checksum, the same ports, no more payload than the first, nothing after a
 * shorter one; and within what one USO write may carry. */
static int uso_follows(const struct fp_gso *g, const uint8_t *p, uint32_t tot,
                       const struct fp_peer *peer)
{
    const uint8_t *h = g->tun_iov[1].iov_base;
    return peer == g->gro_peer && g->gro_proto == IPPROTO_UDP && !g->gro_closed &&
           g->gro_segs < FP_USO_MAX_SEGS && tot - 28 <= g->gro_mss &&
           g->gro_len + (tot - 28) <= FP_MAX_PACKET && !memcmp(p, h, 2) &&
           !memcmp(p + 6, h + 6, 4) && !memcmp(p + 12, h + 12, 12);
}

/* With USO on the TUN, take a UDP datagram into a coalesced write (or start
 * one); 0 if p is not for that, and gro_add carries on with it. */
int uso_add(struct fp_ctx *c, int tun_fd, uint8_t *p, uint32_t tot, struct fp_peer *peer)
{
    struct fp_gso *g = &c->gso;
    if (!(c->offload & FP_OFFLOAD_USO) || !uso_candidate(p, tot))
        return 0;
    uint32_t payload = tot - 28;
    gro_take(c, tun_fd, p, tot, payload, peer, IPPROTO_UDP, g->gro_segs && uso_follows(g, p, tot, peer));
    g->gro_closed = payload < g->gro_mss;
    return 1;
}
