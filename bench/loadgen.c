/*
 * loadgen: a light load generator for the smtpgate line protocol.
 *
 * C, one blocking thread per connection, so that on a 2-core machine the
 * load costs as little CPU as possible and the figure is the daemon's.
 * Each thread sends one request line, waits for its reply, records the
 * round-trip time, and repeats (no pipelining: this is what a PHP or C
 * caller does). Prints one JSON object: requests, errors, seconds, rate,
 * latency percentiles in microseconds.
 *
 *   loadgen HOST PORT CONNECTIONS SECONDS 'SEND {...}' ['AUTH token']
 *
 * The request may contain "%d", replaced by a per-request counter (for
 * distinct subjects or idempotency keys). A sixth argument is sent once on
 * each connection before the timed requests (its reply must be OK).
 *
 * LOADGEN_RATE=N in the environment paces the load instead: N requests a
 * second in all, each connection sending its next one at a fixed schedule
 * (its share of N, the connections' schedules staggered), the latency
 * counted from the scheduled time, not from when the previous reply let
 * the thread send (a daemon that falls behind shows it in the figures
 * rather than slowing the load: no coordinated omission). A load the
 * machine can carry, where a closed loop measures only saturation.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 4000000

static const char *host;
static int port;
static double seconds;
static const char *request;
static const char *first_line; /* sent once per connection, untimed (AUTH) */
static double interval; /* seconds between two requests of one connection when paced, else 0 */
static int conns;
static volatile int stop;
static unsigned *samples; /* latency in microseconds */
static long nsamples;
static long errors;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Read one CRLF-terminated reply into reply[cap]; 0 on success. */
static int read_reply(int fd, char *reply, size_t cap) {
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, reply + got, cap - 1 - got);
        if (r <= 0) return -1;
        got += r;
        if (got >= 2 && reply[got - 2] == '\r' && reply[got - 1] == '\n') return 0;
        if (got == cap - 1) got = 0; /* long reply: keep only the end */
    }
}

static int cmp(const void *a, const void *b) {
    unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;
    return x < y ? -1 : x > y;
}

static void *worker(void *arg) {
    long id = (long)arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        perror("connect");
        exit(2);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    size_t cap = strlen(request) + 64;
    char *line = malloc(cap);
    char reply[4096];
    if (first_line) {
        size_t flen = strlen(first_line);
        if (write(fd, first_line, flen) != (ssize_t)flen || write(fd, "\n", 1) != 1 ||
            read_reply(fd, reply, sizeof reply) != 0 || strncmp(reply, "OK", 2) != 0) {
            fprintf(stderr, "the first line was refused\n");
            exit(2);
        }
    }
    unsigned *mine = malloc(sizeof(unsigned) * 1000000);
    long n = 0, errs = 0;
    double next = now() + interval * id / conns; /* paced: this connection's next scheduled send */
    while (!stop && n < 1000000) {
        int len = snprintf(line, cap - 1, request, (int)(id * 1000000 + n));
        line[len++] = '\n';
        double t0 = now();
        if (interval > 0) {
            if (next > t0) {
                struct timespec until = {(time_t)next, (long)((next - (time_t)next) * 1e9)};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
                if (stop) break;
            }
            t0 = next;
            next += interval;
        }
        for (int off = 0; off < len;) {
            ssize_t w = write(fd, line + off, len - off);
            if (w <= 0) { perror("write"); exit(2); }
            off += w;
        }
        if (read_reply(fd, reply, sizeof reply) != 0) { fprintf(stderr, "connection closed\n"); exit(2); }
        mine[n++] = (unsigned)((now() - t0) * 1e6);
        if (strncmp(reply, "OK", 2) != 0) errs++;
    }
    pthread_mutex_lock(&lock);
    for (long i = 0; i < n && nsamples < MAX_SAMPLES; i++) samples[nsamples++] = mine[i];
    errors += errs;
    pthread_mutex_unlock(&lock);
    close(fd);
    free(mine);
    free(line);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: loadgen HOST PORT CONNECTIONS SECONDS REQUEST [FIRST_LINE]\n");
        return 64;
    }
    first_line = argc == 7 ? argv[6] : NULL;
    host = argv[1];
    port = atoi(argv[2]);
    conns = atoi(argv[3]);
    const char *rate = getenv("LOADGEN_RATE");
    interval = rate && atof(rate) > 0 ? conns / atof(rate) : 0;
    seconds = atof(argv[4]);
    request = argv[5];
    samples = malloc(sizeof(unsigned) * MAX_SAMPLES);
    pthread_t *threads = calloc(conns, sizeof *threads);
    double t0 = now();
    for (long i = 0; i < conns; i++) pthread_create(&threads[i], NULL, worker, (void *)i);
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
    stop = 1;
    for (int i = 0; i < conns; i++) pthread_join(threads[i], NULL);
    double elapsed = now() - t0;
    qsort(samples, nsamples, sizeof(unsigned), cmp);
#define PCT(p) (nsamples ? samples[(long)((nsamples - 1) * (p))] : 0)
    printf("{\"connections\": %d, \"requests\": %ld, \"errors\": %ld, \"seconds\": %.3f, "
           "\"rate\": %.0f, \"p50_us\": %u, \"p90_us\": %u, \"p99_us\": %u, \"max_us\": %u}\n",
           conns, nsamples, errors, elapsed, nsamples / elapsed, PCT(0.5), PCT(0.9), PCT(0.99),
           PCT(1.0));
    return 0;
}
