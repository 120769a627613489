/* The forwarding loop ("c-loop"): wait in epoll and move both directions in
 * C, without returning to Python between wake-ups. A wake-up through uvloop,
 * a Python callback and a cffi call cost more than the packet's own work on
 * a ping-pong; here the thread that calls fp_run (the GIL released, as cffi
 * does for every call) is woken by the kernel straight into C.
 *
 * It reads the clock itself, once per wake-up (the ICMP rate limit's now),
 * since no caller runs between wake-ups to pass it in. */
#include <errno.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* The drain's rule, as tunproxy.backends.udp.read_replies/next_misses for
 * the event-loop path: read the TUN after a write while replies turn up;
 * after REPLY_MISSES wake-ups without one, only every REPLY_PROBE-th. */
enum { REPLY_MISSES = 4, REPLY_PROBE = 64 };

static int read_replies(uint32_t misses)
{
    return misses < REPLY_MISSES || misses == REPLY_MISSES + REPLY_PROBE - 1;
}

static uint32_t next_misses(uint32_t misses, int found)
{
    if (found)
        return 0;
    return misses < REPLY_MISSES + REPLY_PROBE - 1 ? misses + 1 : REPLY_MISSES;
}

static uint64_t monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A call that found nothing to do is not an error. */
static int idle(int r) { return r == -EAGAIN || r == -EWOULDBLOCK || r == -EINTR; }

int fp_run(struct fp_ctx *c, int epfd, int tun_fd, int udp_fd, int stop_fd, int yield_fd, uint32_t drain)
{
    struct epoll_event ev[4];
    uint32_t misses = 0; /* starts again at each call: a yield or an error is rare */
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
                if (r > 0 && drain && !c->gso_errno) {
                    int found = 0;
                    if (read_replies(misses)) {
                        int d = fp_tun_to_udp(c, tun_fd, udp_fd, now);
                        if (d == -EBADFD)
                            return FP_RUN_TUN_GONE;
                        if (d < 0 && !idle(d))
                            return d;
                        found = d > 0;
                    }
                    misses = next_misses(misses, found);
                }
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
