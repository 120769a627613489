/* CHECK(cond): a harness's own assertion, kept in sanitizer builds (unlike
 * assert with NDEBUG); a failure prints where and aborts, which libFuzzer
 * reports as a crash and saves the input for. */
#ifndef TUNPROXY_FUZZ_CHECK_H
#define TUNPROXY_FUZZ_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                   \
        }                                                                              \
    } while (0)

#endif
