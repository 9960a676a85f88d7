/* harness.h: a plain assert harness. A failed CHECK prints where and goes on,
 * so one run shows every failure; main returns TEST_RESULT(). */
#ifndef SMTPGATE_TEST_HARNESS_H
#define SMTPGATE_TEST_HARNESS_H

#include <stdio.h>
#include <string.h>

static int test_checks, test_failures;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        test_checks++;                                                                 \
        if (!(cond)) {                                                                 \
            test_failures++;                                                           \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);   \
        }                                                                              \
    } while (0)

#define CHECK_STR(got, want)                                                           \
    do {                                                                               \
        const char *g_ = (got), *w_ = (want);                                          \
        test_checks++;                                                                 \
        if (g_ == NULL || strcmp(g_, w_) != 0) {                                       \
            test_failures++;                                                           \
            fprintf(stderr, "%s:%d: %s\n  got:  %s\n  want: %s\n", __FILE__, __LINE__, \
                    #got, g_ ? g_ : "(null)", w_);                                     \
        }                                                                              \
    } while (0)

#define RUN(test)                                                                      \
    do {                                                                               \
        int before_ = test_failures;                                                   \
        test();                                                                        \
        printf("%s %s\n", test_failures == before_ ? "ok  " : "FAIL", #test);          \
    } while (0)

#define TEST_RESULT()                                                                  \
    (printf("%d checks, %d failed\n", test_checks, test_failures), test_failures ? 1 : 0)

#endif
