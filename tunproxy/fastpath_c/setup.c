/*
 * fp_init: the one place the configuration and the caller's memory are
 * checked, so the per-packet code can trust them; the ring and the send
 * queue are wired up here once, never per call.
 */
#include "internal.h"

int fp_init(struct fp_ctx *c)
{
    struct fp_ring *r = &c->ring;
    struct fp_gso *g = &c->gso;
    if (!r->data || !r->len || !r->addr || !r->iov || !r->msg || !c->routes ||
        !c->routes_alt || !c->peers || !c->peers_alt || (c->ndrops && !c->drops))
        return -EFAULT;
    if (c->batch < 1 || c->batch > r->nslots || r->slot_size <= r->headroom ||
        r->slot_size - r->headroom > FP_MAX_PACKET || c->mtu < 68 || c->mtu > FP_MAX_PACKET ||
        c->max_routes < 1 || (uint64_t)c->route_cap < 2 * (uint64_t)c->max_routes ||
        (c->route_cap & (c->route_cap - 1)) || (uint64_t)c->peer_cap < 4 * (uint64_t)c->max_routes ||
        (c->peer_cap & (c->peer_cap - 1)) ||
        (c->offload & ~(FP_OFFLOAD_VNET | FP_OFFLOAD_UDP_GSO | FP_OFFLOAD_USO)) ||
        ((c->offload & FP_OFFLOAD_USO) && !(c->offload & FP_OFFLOAD_VNET)) ||
        (c->features & ~(FP_FEAT_FAST_CSUM | FP_FEAT_CSUM_NO_SIMD | FP_FEAT_DRAIN)))
        return -EINVAL;
    if (c->offload) {
        if (!g->out || !g->msg || !g->iov || !g->addr || !g->segs || !g->seg_size || !g->cmsg ||
            !g->rx_cmsg || !g->tun_iov)
            return -EFAULT;
        if (g->nmsg < 1 || g->out_size < FP_MAX_PACKET ||
            ((c->offload & FP_OFFLOAD_VNET) && r->headroom < FP_VNET_HDR_LEN))
            return -EINVAL;
        for (uint32_t i = 0; i < g->nmsg; i++) {
            memset(&g->msg[i], 0, sizeof g->msg[i]);
            g->msg[i].msg_hdr.msg_name = &g->addr[i];
            g->msg[i].msg_hdr.msg_namelen = sizeof g->addr[i];
            g->msg[i].msg_hdr.msg_iov = &g->iov[i];
            g->msg[i].msg_hdr.msg_iovlen = 1;
        }
        g->n = g->used = g->gro_segs = 0;
    }
    for (uint32_t i = 0; i < r->nslots; i++) {
        r->iov[i] = (struct iovec){.iov_base = slot(r, i), .iov_len = 0};
        memset(&r->msg[i], 0, sizeof r->msg[i]);
        r->msg[i].msg_hdr.msg_name = &r->addr[i];
        r->msg[i].msg_hdr.msg_namelen = sizeof r->addr[i];
        r->msg[i].msg_hdr.msg_iov = &r->iov[i];
        r->msg[i].msg_hdr.msg_iovlen = 1;
        r->len[i] = 0;
    }
    memset(c->routes, 0, (size_t)c->route_cap * sizeof *c->routes);
    memset(c->peers, 0, (size_t)c->peer_cap * sizeof *c->peers);
    memset(c->len_count, 0, sizeof c->len_count);
    memset(&c->cnt, 0, sizeof c->cnt);
    c->gso_errno = 0;
    c->drops_total = 0;
    c->now_ms = 0;
    c->nroutes = 0;
    c->reply_misses = 0;
    c->len_mask = 0;
    c->tokens = (uint64_t)c->icmp_burst * 1000;
    c->last_ms = 0;
    return 0;
}
