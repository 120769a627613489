/* The forwarding loop ("c-loop"): wait in epoll and move both directions in
 * C, without returning to Python between wake-ups. A wake-up through uvloop,
 * a Python callback and a cffi call cost more than the packet's own work on a
 * ping-pong; here the thread that calls fp_run (the GIL released, as cffi does
 * for every call) is woken by the kernel straight into C. It reads the clock
 * itself, once per wake-up (the ICMP rate limit's now), since no caller runs
 * between wake-ups to pass it in. */
#include <errno.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static uint64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A call that found nothing to do is not an error. */
static int idle(int r) { return r == -EAGAIN || r == -EWOULDBLOCK || r == -EINTR; }

int fp_run(struct fp_ctx *c, int epfd, int tun_fd, int udp_fd, int stop_fd, int yield_fd)
{
    struct epoll_event ev[4];
    for (;;) {
        int n = epoll_wait(epfd, ev, 4, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        /* Stop and yield first: a data fd that keeps failing must not hide them (a
         * level-triggered epoll reports ready fds in the same order every time). */
        for (int i = 0; i < n; i++) {
            if (ev[i].data.fd == stop_fd)
                return FP_RUN_STOP;
            if (ev[i].data.fd == yield_fd) {
                uint64_t count;
                if (read(yield_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                    return -errno;
                return FP_RUN_YIELD;
            }
        }
        uint64_t now = monotonic_ms();
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd, r;
            if (fd == tun_fd) {
                r = fp_tun_to_udp(c, tun_fd, udp_fd, now);
                if (r == -EBADFD)
                    return FP_RUN_TUN_GONE;
            } else if (fd == udp_fd) {
                r = fp_udp_to_tun(c, udp_fd, tun_fd, now);
            } else {
                continue;
            }
            if (c->gso_errno)
                return FP_RUN_GSO_REFUSED;
            if (r < 0 && !idle(r))
                return r;
        }
    }
}
