/*
 * Offload mode (this file: tun -> udp)
 *
 * Batching alone leaves a system call per packet on the TUN side, and that
 * caps a userspace tunnel near 2.5 Gbit/s in any language (REFERENCE.md).
 * The kernel can hand over bigger units, so in offload mode we let it:
 *
 *  - The TUN has IFF_VNET_HDR with TSO4 and checksum offload.  One read()
 *    returns a virtio_net_hdr and a TCP "super-packet" of up to 64 KiB whose
 *    checksum is left to the "hardware", which is us.  We cut it into MSS-sized
 *    packets as the kernel's tcp_gso_segment would, and complete the partial
 *    checksums of other packets as skb_checksum_help would.  The cutting is
 *    ours, not the kernel's, because the wire must not change: one inner
 *    packet per datagram, so a plain peer (or flannel) sees nothing new.
 *  - Every datagram is copied into a send queue (struct fp_gso), where a run
 *    of equal-sized datagrams to one peer becomes one sendmmsg message with
 *    UDP_SEGMENT: one system call sends ~45 datagrams, which the kernel (or
 *    the NIC) cuts apart.  Copying costs little next to the checksum we must
 *    compute anyway, and lets small packets (ACKs) be trained up too.
 *  - With TUN_F_USO4|TUN_F_USO6 (kernel 6.2+) a read may also be a UDP
 *    "train" (VIRTIO_NET_HDR_GSO_UDP_L4): one UDP header over gso_size-byte
 *    datagrams, as a UDP_SEGMENT sender made it.  We cut it as the kernel's
 *    __udp_gso_segment would (uso_split), one datagram per outer datagram.
 *  - The way back is offload_rx.c's.
 *
 * If the kernel refuses UDP_SEGMENT (EIO: no checksum offload on the route;
 * EINVAL) we send those datagrams one by one, turn GSO off for good and say so
 * in gso_errno, as wireguard-go does with ErrUDPGSODisabled.
 */
#include "internal.h"

/* Offload mode: send queued messages [from, n) a datagram at a time, because
 * the kernel just refused UDP_SEGMENT.  Happens once in a process's life. */
static void send_singly(struct fp_ctx *c, int fd, uint32_t from)
{
    struct fp_gso *g = &c->gso;
    for (uint32_t i = from; i < g->n; i++) {
        const uint8_t *p = g->iov[i].iov_base;
        uint32_t left = (uint32_t)g->iov[i].iov_len;
        for (uint32_t len; left; p += len, left -= len) {
            len = min32(left, g->seg_size[i]);
            if (sendto(fd, p, len, MSG_DONTWAIT, (struct sockaddr *)&g->addr[i],
                       sizeof g->addr[i]) != (ssize_t)len) {
                send_dropped(c, &g->addr[i], p, len, 1);
                continue;
            }
            count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch, 1);
            count_sent(c, &g->addr[i], 1, len);
        }
    }
}

/* Send the whole queue, a UDP_SEGMENT cmsg on each message of several
 * datagrams, with as few sendmmsg calls as the kernel allows; empty it. */
static void gso_flush(struct fp_ctx *c, int fd)
{
    struct fp_gso *g = &c->gso;
    uint32_t n = g->n;
    for (uint32_t i = 0; i < n; i++) {
        struct msghdr *h = &g->msg[i].msg_hdr;
        h->msg_control = NULL;
        h->msg_controllen = 0;
        if (g->segs[i] > 1) {
            uint16_t size = (uint16_t)g->seg_size[i];
            h->msg_control = g->cmsg + (size_t)i * FP_CMSG_WORDS;
            h->msg_controllen = CMSG_SPACE(sizeof size);
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof size);
            memcpy(CMSG_DATA(cm), &size, sizeof size);
        }
    }
    for (uint32_t done = 0; done < n;) {
        int k = sendmmsg(fd, g->msg + done, n - done, MSG_DONTWAIT);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            if (k == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
                for (; done < n; done++)
                    send_dropped(c, &g->addr[done], g->iov[done].iov_base, g->seg_size[done],
                                 g->segs[done]);
                break;
            }
            if ((errno == EIO || errno == EINVAL) && g->segs[done] > 1) {
                c->offload &= ~(uint32_t)FP_OFFLOAD_UDP_GSO;
                c->gso_errno = errno;
                send_singly(c, fd, done);
                break;
            }
            send_dropped(c, &g->addr[done], g->iov[done].iov_base, g->seg_size[done], g->segs[done]);
            done++;
            continue;
        }
        uint32_t sent = 0;
        for (uint32_t i = done; i < done + (uint32_t)k; i++) {
            count_sent(c, &g->addr[i], g->segs[i], g->iov[i].iov_len);
            sent += g->segs[i];
            if (g->segs[i] > 1) {
                c->cnt.gso_sends++;
                c->cnt.gso_segments += g->segs[i];
            }
        }
        count_batch(&c->cnt.tx_batches, &c->cnt.tx_multi_batches, &c->cnt.tx_max_batch, sent);
        done += (uint32_t)k;
    }
    g->n = g->used = 0;
}

/* Room for one len-byte datagram to peer at the end of the queue: in the last
 * message if UDP_SEGMENT can carry the two together (same peer, that message's
 * datagrams all full-sized and no bigger than the MTU, so the kernel never has
 * to fragment one, and within the kernel's limits), else in a new message. */
static uint8_t *gso_add(struct fp_ctx *c, int fd, uint32_t peer, uint32_t len)
{
    struct fp_gso *g = &c->gso;
    uint32_t i = g->n - 1;
    if (g->n && (c->offload & FP_OFFLOAD_UDP_GSO) && g->addr[i].sin_addr.s_addr == htonl(peer) &&
        len <= g->seg_size[i] && g->seg_size[i] <= c->mtu && g->segs[i] < FP_GSO_MAX_SEGS &&
        g->iov[i].iov_len == (size_t)g->segs[i] * g->seg_size[i] &&
        g->iov[i].iov_len + len <= FP_GSO_MAX_BYTES && g->used + len <= g->out_size) {
        g->segs[i]++;
        g->iov[i].iov_len += len;
        g->used += len;
        return g->out + g->used - len;
    }
    if (g->n == g->nmsg || g->used + len > g->out_size)
        gso_flush(c, fd);
    i = g->n++;
    g->iov[i] = (struct iovec){.iov_base = g->out + g->used, .iov_len = len};
    g->addr[i] = (struct sockaddr_in){
        .sin_family = AF_INET,
        .sin_port = htons(c->port),
        .sin_addr.s_addr = htonl(peer),
    };
    g->segs[i] = 1;
    g->seg_size[i] = len;
    g->used += len;
    return g->iov[i].iov_base;
}

/* Queue TSO packet p (tot bytes, TCP headers ending at hlen) as the packets
 * the kernel's tcp_gso_segment would make of it: mss payload bytes each, IP
 * ID + 1 and sequence number + mss per packet, FIN and PSH only on the last,
 * CWR only on the first, both checksums computed afresh.  With
 * FP_FEAT_FAST_CSUM each payload byte is read once, summed as it is copied
 * (csum_copy); else copied, then summed. */
static void tso_split(struct fp_ctx *c, int fd, const uint8_t *p, uint32_t tot, uint32_t hlen,
                      uint32_t mss, uint32_t peer)
{
    uint32_t ihl = (p[0] & 15) * 4u, seq = get32(p + ihl + 4), id = get16(p + 4), n = 0;
    uint32_t fast = c->features & FP_FEAT_FAST_CSUM ? c->features : 0;
    for (uint32_t off = hlen; n == 0 || off < tot; off += mss, n++) {
        uint32_t plen = min32(mss, tot - off), len = hlen + plen, psum = 0;
        uint8_t *o = gso_add(c, fd, peer, len);
        memcpy(o, p, hlen);
        if (fast)
            psum = csum_copy(o + hlen, p + off, plen, 0, fast);
        else
            memcpy(o + hlen, p + off, plen);
        put16(o + 2, len);
        put16(o + 4, id + n);
        put16(o + 10, 0);
        put16(o + 10, csum(o, ihl));
        put32(o + ihl + 4, seq + (off - hlen));
        if (off + mss < tot)
            o[ihl + 13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (n)
            o[ihl + 13] &= (uint8_t)~TCP_CWR;
        if (fast) {
            /* the payload's sum, added to the headers': the TCP header length
             * is a multiple of 4, so the payload starts on a 16-bit word */
            put16(o + ihl + 16, 0);
            uint32_t s = ~sum16(o + ihl, hlen - ihl, pseudo_sum(o, len - ihl) + psum) & 0xffff;
            put16(o + ihl + 16, s ? s : 0xffff);
        } else {
            put16(o + ihl + 16, pseudo_sum(o, len - ihl));
            csum_finish(o, len, ihl, 16, 0);
        }
    }
    c->cnt.tso_packets++;
    c->cnt.tso_segments += n;
}

/* Queue UDP train p (tot bytes, UDP header at ihl) as the datagrams the
 * kernel's __udp_gso_segment would make of it: size payload bytes each (the
 * last may be shorter), IP ID + 1 per datagram, IP header checksum, UDP
 * length and UDP checksum computed afresh.  A train that says it has no UDP
 * checksum (0 in the field, and no NEEDS_CSUM asking for one: RFC 768)
 * keeps none; a computed 0 goes out as 0xFFFF (csum_finish). */
static void uso_split(struct fp_ctx *c, int fd, const uint8_t *p, uint32_t tot, uint32_t size,
                      uint32_t peer, int no_csum)
{
    uint32_t ihl = (p[0] & 15) * 4u, hlen = ihl + 8, id = get16(p + 4), n = 0;
    for (uint32_t off = hlen; n == 0 || off < tot; off += size, n++) {
        uint32_t len = hlen + min32(size, tot - off);
        uint8_t *o = gso_add(c, fd, peer, len);
        memcpy(o, p, hlen);
        memcpy(o + hlen, p + off, len - hlen);
        put16(o + 2, len);
        put16(o + 4, id + n);
        put16(o + 10, 0);
        put16(o + 10, csum(o, ihl));
        put16(o + ihl + 4, len - ihl);
        if (!no_csum) {
            put16(o + ihl + 6, pseudo_sum(o, len - ihl));
            csum_finish(o, len, ihl, 6, c->features);
        }
    }
    c->cnt.uso_packets++;
    c->cnt.uso_segments += n;
}

/* The datagram size of UDP train p (tot bytes), 0 if it is not one we can
 * cut: USO was asked for and granted, UDP, no fragment, a whole UDP header
 * and a gso_size.  hdr_len and the UDP length field are not trusted. */
static uint32_t uso_size(const struct fp_ctx *c, const uint8_t *p, uint32_t tot,
                         const struct virtio_net_hdr *v)
{
    uint32_t ihl = (p[0] & 15) * 4u;
    if (!(c->offload & FP_OFFLOAD_USO) || p[9] != IPPROTO_UDP || (get16(p + 6) & 0x3fff) ||
        ihl + 8 > tot)
        return 0;
    return v->gso_size;
}

/* One read from the TUN in offload mode (v is zero without IFF_VNET_HDR):
 * checked, completed or cut up, routed, queued. */
static void tx_packet(struct fp_ctx *c, int tun_fd, int udp_fd, uint8_t *p, size_t n,
                      const struct virtio_net_hdr *v, uint64_t now)
{
    uint32_t tot = ip_valid(p, n), ihl, hlen = 0, seg = tot, peer, uso = 0;
    if (!tot)
        goto malformed;
    ihl = (p[0] & 15) * 4u;
    if (v->gso_type == VIRTIO_NET_HDR_GSO_UDP_L4) {
        if (!(uso = uso_size(c, p, tot, v)))
            goto malformed;
        seg = min32(tot, ihl + 8 + uso);
    } else if (v->gso_type != VIRTIO_NET_HDR_GSO_NONE) {
        /* hdr_len is not trusted: on the forwarding path it can be a whole packet. */
        if ((v->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_TCPV4 || p[9] != 6 ||
            !v->gso_size || (get16(p + 6) & 0x3fff) || ihl + 20 > tot)
            goto malformed;
        hlen = ihl + (p[ihl + 12] >> 4) * 4u;
        if (hlen < ihl + 20 || hlen > tot)
            goto malformed;
        seg = min32(tot, hlen + v->gso_size);
    } else if (v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        /* The checksum is a transport header's: never inside the IP header we route by. */
        if (v->csum_start < ihl || (uint32_t)v->csum_start + v->csum_offset + 2 > tot)
            goto malformed;
        csum_finish(p, tot, v->csum_start, v->csum_offset, c->features);
        c->cnt.csum_completed++;
    }
    if (!(peer = next_hop(c, tun_fd, p, tot, seg, now)))
        return;
    ttl_dec(p);
    if (uso)
        uso_split(c, udp_fd, p, tot, uso, peer,
                  !(v->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !get16(p + ihl + 6));
    else if (hlen)
        tso_split(c, udp_fd, p, tot, hlen, v->gso_size, peer);
    else
        memcpy(gso_add(c, udp_fd, peer, tot), p, tot);
    return;
malformed:
    drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_TX, 0, p, (uint32_t)n, 1);
}

int tun_to_udp_offload(struct fp_ctx *c, int tun_fd, int udp_fd, uint64_t now)
{
    struct fp_ring *r = &c->ring;
    uint32_t vnet = c->offload & FP_OFFLOAD_VNET ? FP_VNET_HDR_LEN : 0;
    uint32_t cap = r->slot_size - r->headroom, taken = 0;
    uint8_t *p = slot(r, 0); /* every packet is copied out before the next read */
    struct virtio_net_hdr v = {0};
    int err = 0;
    while (taken < c->batch) {
        ssize_t got = read(tun_fd, p - vnet, cap + vnet);
        if (got < 0) {
            err = -errno;
            break;
        }
        taken++;
        if ((size_t)got < vnet) {
            drop(c, &c->cnt.drop_malformed, FP_DROP_MALFORMED, FP_DIR_TX, 0, p, 0, 1);
            continue;
        }
        memcpy(&v, p - vnet, vnet);
        tx_packet(c, tun_fd, udp_fd, p, (size_t)got - vnet, &v, now);
    }
    gso_flush(c, udp_fd);
    if (!taken)
        return err;
    return (int)taken;
}
