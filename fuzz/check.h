/* What both harnesses share.  CHECK(cond): a harness's own assertion, kept in sanitizer builds (unlike
 * assert with NDEBUG); a failure prints where and aborts, which libFuzzer
 * reports as a crash and saves the input for. */
#ifndef TUNPROXY_FUZZ_CHECK_H
#define TUNPROXY_FUZZ_CHECK_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                   \
        }                                                                              \
    } while (0)

/* The fuzzer's input, read front to back; past its end every read is 0. */
struct in {
    const uint8_t *p;
    size_t n;
};

/* The next ``bytes`` (1 to 4) bytes as a little-endian number. */
static inline uint32_t take(struct in *in, int bytes)
{
    uint32_t v = 0;
    for (int i = 0; i < bytes && in->n; i++, in->p++, in->n--)
        v |= (uint32_t)in->p[0] << (8 * i);
    return v;
}

#endif
