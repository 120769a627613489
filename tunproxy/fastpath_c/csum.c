/*
 * Checksums and the IPv4 header checks every packet passes: the one's
 * complement sum (RFC 1071), completing a partial checksum, a header's
 * soundness, the TTL decrement.
 */
#include "internal.h"

/* Fold a native-order 64-bit sum of 16-bit words to 16 bits, swap it to
 * network order and add sum: RFC 1071 2(B), the sum does not care about byte
 * order, so the words are added as they lie in memory and swapped once. */
static uint32_t fold(uint64_t s, uint32_t sum)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    s = ntohs((uint16_t)s) + (uint64_t)sum;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

/* The native-order sum of the last n < 32 bytes at p, added to s. */
static uint64_t sum_tail(const uint8_t *p, size_t n, uint64_t s)
{
    uint64_t d;
    uint16_t h;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&d, p, 8);
        s += (d & 0xffffffffu) + (d >> 32);
    }
    for (; n >= 2; p += 2, n -= 2) {
        memcpy(&h, p, 2);
        s += h;
    }
    if (n) {
        uint8_t last[2] = {p[0], 0};
        memcpy(&h, last, 2);
        s += h;
    }
    return s;
}

/* The one's complement sum (RFC 1071) of p[0..n) as big-endian 16-bit words,
 * plus sum, folded to 16 bits, not complemented.  Offload mode sums every byte
 * that passes, so this adds native 32-bit halves of 64-bit words into four
 * 64-bit accumulators (no carries lost below 2^32 words).  The scalar path:
 * what runs --without fast-csum, and the fallback of sum16_fast. */
uint32_t sum16(const uint8_t *p, size_t n, uint32_t sum)
{
    uint64_t a[4] = {0, 0, 0, 0}, d;
    for (; n >= 32; p += 32, n -= 32) {
        for (int i = 0; i < 4; i++) {
            memcpy(&d, p + 8 * i, 8);
            a[i] += (d & 0xffffffffu) + (d >> 32);
        }
    }
    return fold(sum_tail(p, n, a[0] + a[1] + a[2] + a[3]), sum);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* AVX2: 64 bytes a round, each 32-bit word widened to 64 bits (unpack with
 * zero) and added into four lanes of two accumulators; same sum, same fold. */
#define SUM_AVX2_ROUND(a, b, acc0, acc1, z)                                                        \
    do {                                                                                           \
        acc0 = _mm256_add_epi64(acc0, _mm256_unpacklo_epi32(a, z));                                \
        acc1 = _mm256_add_epi64(acc1, _mm256_unpackhi_epi32(a, z));                                \
        acc0 = _mm256_add_epi64(acc0, _mm256_unpacklo_epi32(b, z));                                \
        acc1 = _mm256_add_epi64(acc1, _mm256_unpackhi_epi32(b, z));                                \
    } while (0)

__attribute__((target("avx2"))) static uint64_t lanes(__m256i acc0, __m256i acc1)
{
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, _mm256_add_epi64(acc0, acc1));
    /* each lane is below 2^63 for any n we see, so the four add without loss */
    return (v[0] & 0xffffffffu) + (v[0] >> 32) + (v[1] & 0xffffffffu) + (v[1] >> 32) +
           (v[2] & 0xffffffffu) + (v[2] >> 32) + (v[3] & 0xffffffffu) + (v[3] >> 32);
}

__attribute__((target("avx2"))) static uint32_t sum16_avx2(const uint8_t *p, size_t n, uint32_t sum)
{
    __m256i z = _mm256_setzero_si256(), acc0 = z, acc1 = z;
    for (; n >= 64; p += 64, n -= 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)p);
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + 32));
        SUM_AVX2_ROUND(a, b, acc0, acc1, z);
    }
    uint64_t s = lanes(acc0, acc1);
    _mm256_zeroupper(); /* no AVX-SSE transition penalty for the caller's code */
    if (n >= 32) {
        uint64_t d;
        for (int i = 0; i < 4; i++, p += 8) {
            memcpy(&d, p, 8);
            s += (d & 0xffffffffu) + (d >> 32);
        }
        n -= 32;
    }
    return fold(sum_tail(p, n, s), sum);
}

__attribute__((target("avx2"))) static uint32_t csum_copy_avx2(uint8_t *dst, const uint8_t *src, size_t n,
                                                               uint32_t sum)
{
    __m256i z = _mm256_setzero_si256(), acc0 = z, acc1 = z;
    for (; n >= 64; src += 64, dst += 64, n -= 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)src);
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + 32));
        _mm256_storeu_si256((__m256i *)dst, a);
        _mm256_storeu_si256((__m256i *)(dst + 32), b);
        SUM_AVX2_ROUND(a, b, acc0, acc1, z);
    }
    uint64_t s = lanes(acc0, acc1);
    _mm256_zeroupper();
    memcpy(dst, src, n);
    if (n >= 32) {
        uint64_t d;
        for (int i = 0; i < 4; i++, src += 8) {
            memcpy(&d, src, 8);
            s += (d & 0xffffffffu) + (d >> 32);
        }
        n -= 32;
    }
    return fold(sum_tail(src, n, s), sum);
}

static int have_avx2(void)
{
    static int known = -1;  /* a race here writes the same answer twice */
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return known;
}
#else
static int have_avx2(void) { return 0; }
#define sum16_avx2 sum16
#define csum_copy_avx2(d, s, n, sum) (memcpy(d, s, n), sum16(d, n, sum))
#endif

/* Whether the FP_FEAT_* bits in fast ask for the AVX2 code and the CPU has it. */
static int use_avx2(uint32_t fast)
{
    return (fast & FP_FEAT_FAST_CSUM) && !(fast & FP_FEAT_CSUM_NO_SIMD) && have_avx2();
}

/* sum16, the fastest way this CPU has (AVX2, checked at run time) if fast
 * has FP_FEAT_FAST_CSUM, else the scalar (already wide, portable) sum16. */
uint32_t sum16_fast(const uint8_t *p, size_t n, uint32_t sum, uint32_t fast)
{
    return use_avx2(fast) ? sum16_avx2(p, n, sum) : sum16(p, n, sum);
}

/* Copy src[0..n) to dst and return its sum16 (plus sum): in one pass (as
 * the kernel's csum_partial_copy) with AVX2, if fast asks for it and the CPU
 * has it; else memcpy, then sum16 over the copy while it is in L1 (a
 * portable one-pass loop measured 2-3 times slower than that: glibc's
 * memcpy is vectorised, a loop of 8-byte words is not). */
uint32_t csum_copy(uint8_t *dst, const uint8_t *src, size_t n, uint32_t sum, uint32_t fast)
{
    if (use_avx2(fast))
        return csum_copy_avx2(dst, src, n, sum);
    memcpy(dst, src, n);
    return sum16(dst, n, sum);
}

uint32_t fp_sum16(const uint8_t *p, size_t n, uint32_t sum, uint32_t fast)
{
    return sum16_fast(p, n, sum, fast);
}

uint32_t fp_csum_copy(uint8_t *dst, const uint8_t *src, size_t n, uint32_t sum, uint32_t fast)
{
    return csum_copy(dst, src, n, sum, fast);
}

int fp_have_avx2(void) { return have_avx2(); }

/* Complete a partial checksum as the kernel's skb_checksum_help does: the
 * field at start + off holds the pseudo-header sum, so sum [start, len) over
 * it.  0 goes out as 0xFFFF, the same number, and the only one UDP allows. */
void csum_finish(uint8_t *p, uint32_t len, uint32_t start, uint32_t off, uint32_t fast)
{
    uint32_t s = ~sum16_fast(p + start, len - start, 0, fast) & 0xffff;
    put16(p + start + off, s ? s : 0xffff);
}

/* The packet's total length if it is a sound IPv4 packet of n bytes, else 0.
 * Trailing bytes past the total length are ignored (and later not sent). */
uint32_t ip_valid(const uint8_t *p, size_t n)
{
    if (n < 20 || p[0] >> 4 != 4)
        return 0;
    uint32_t ihl = (p[0] & 15) * 4u, tot = get16(p + 2);
    if (ihl < 20 || ihl > n || tot < ihl || tot > n || csum(p, ihl) != 0)
        return 0;
    return tot;
}

/* TTL - 1, checksum patched per RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'). */
void ttl_dec(uint8_t *p)
{
    uint32_t m = get16(p + 8);
    p[8]--;
    uint32_t s = (~get16(p + 10) & 0xffff) + (~m & 0xffff) + get16(p + 8);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    put16(p + 10, ~s);
}
