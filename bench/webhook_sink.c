/*
 * webhook_sink: a webhook receiver for bench/http_bench.py, what smtp-sink
 * is to its SMTP side: as cheap as a correct receiver can be, so that the
 * bench's figures are smtpgate's and not the receiver's (in production the
 * receiver is on another machine; here it shares the 2 cores).
 *
 *     webhook_sink PORT        (the secret, whsec_..., in $HTTP_BENCH_SECRET)
 *
 * The same contract as http_bench.py's LeanReceiver: HTTP/1.1 keep-alive
 * requests framed by Content-Length, pipelined or not (the answers to the
 * requests of one read go out in one write); 204 to a POST to /hook, and the
 * Standard Webhooks signature of every 16th event checked (HMAC-SHA256 of
 * "id.timestamp.body", base64, against each "v1,..." of webhook-signature;
 * the body must name a message_id), so a wrong one cannot pass unseen;
 * GET /count answers "received bad"; anything else a 400 and a close.
 * Loopback only, one thread, epoll.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define VERIFY_EVERY 16
#define MAX_HEAD 65536
#define BUF_SIZE (1 << 20)

struct conn {
    int fd;
    size_t len;
    char buf[BUF_SIZE];
};

static unsigned char key[256];
static int key_len;
static unsigned long received, bad;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

/* The value of header `name` (lower case) in head[0..head_len), or NULL; its length in *len. */
static const char *header(const char *head, size_t head_len, const char *name, size_t *len)
{
    size_t n = strlen(name);
    const char *p = memchr(head, '\n', head_len);
    while (p && (size_t)(p + 1 - head) < head_len) {
        const char *line = p + 1;
        const char *end = memchr(line, '\r', head_len - (line - head));
        if (!end)
            end = head + head_len;
        if ((size_t)(end - line) > n + 1 && strncasecmp(line, name, n) == 0 && line[n] == ':') {
            const char *v = line + n + 1;
            while (*v == ' ')
                v++;
            *len = end - v;
            return v;
        }
        p = memchr(line, '\n', head_len - (line - head));
    }
    return NULL;
}

static int verified(const char *head, size_t head_len, const char *body, size_t body_len)
{
    size_t id_len, ts_len, sig_len;
    const char *id = header(head, head_len, "webhook-id", &id_len);
    const char *ts = header(head, head_len, "webhook-timestamp", &ts_len);
    const char *sig = header(head, head_len, "webhook-signature", &sig_len);
    if (!id || !ts || !sig)
        return 0;
    static unsigned char signed_content[BUF_SIZE + 512];
    if (id_len + ts_len + 2 + body_len > sizeof signed_content)
        return 0;
    size_t n = 0;
    memcpy(signed_content, id, id_len), n += id_len;
    signed_content[n++] = '.';
    memcpy(signed_content + n, ts, ts_len), n += ts_len;
    signed_content[n++] = '.';
    memcpy(signed_content + n, body, body_len), n += body_len;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len;
    HMAC(EVP_sha256(), key, key_len, signed_content, n, mac, &mac_len);
    char want[128];
    int want_len = EVP_EncodeBlock((unsigned char *)want, mac, mac_len);
    /* Space-separated "v1,<base64>" signatures: any one may match. */
    const char *p = sig, *end = sig + sig_len;
    while (p < end) {
        const char *q = memchr(p, ' ', end - p);
        if (!q)
            q = end;
        if (q - p == want_len + 3 && memcmp(p, "v1,", 3) == 0 && CRYPTO_memcmp(p + 3, want, want_len) == 0)
            return memmem(body, body_len, "\"message_id\":\"", 14) != NULL;
        p = q + 1;
    }
    return 0;
}

/* Answers every whole request in c->buf; 0 to keep the connection, -1 to close it. */
static int serve(struct conn *c)
{
    static char out[BUF_SIZE];
    size_t out_len = 0, at = 0;
    int close_after = 0;
    while (!close_after) {
        char *head = c->buf + at;
        size_t avail = c->len - at;
        char *end = memmem(head, avail, "\r\n\r\n", 4);
        if (!end) {
            if (avail > MAX_HEAD)
                close_after = 1;
            break;
        }
        size_t head_len = end - head, cl_len;
        const char *cl = header(head, head_len, "content-length", &cl_len);
        size_t length = cl ? strtoul(cl, NULL, 10) : 0;
        if (head_len + 4 + length > BUF_SIZE - 1) {
            close_after = 1;
            break;
        }
        if (avail < head_len + 4 + length)
            break;
        const char *body = end + 4;
        const char *answer;
        if (avail >= 11 && memcmp(head, "POST /hook ", 11) == 0) {
            received++;
            if (received % VERIFY_EVERY == 0 && !verified(head, head_len, body, length))
                bad++;
            answer = "HTTP/1.1 204 No Content\r\n\r\n";
        } else if (avail >= 11 && memcmp(head, "GET /count ", 11) == 0) {
            static char text[128];
            char figures[64];
            int n = snprintf(figures, sizeof figures, "%lu %lu", received, bad);
            snprintf(text, sizeof text, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", n, figures);
            answer = text;
        } else {
            answer = "HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n";
            close_after = 1;
        }
        size_t n = strlen(answer);
        if (out_len + n > sizeof out)
            break;
        memcpy(out + out_len, answer, n);
        out_len += n;
        at += head_len + 4 + length;
    }
    memmove(c->buf, c->buf + at, c->len - at);
    c->len -= at;
    for (size_t sent = 0; sent < out_len;) {
        ssize_t w = write(c->fd, out + sent, out_len - sent);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) { /* the peer reads slower than it sends: wait for it */
            struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
            poll(&pfd, 1, 10000);
            continue;
        }
        if (w < 0)
            return -1;
        sent += w;
    }
    return close_after ? -1 : 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: webhook_sink PORT (secret in $HTTP_BENCH_SECRET)\n");
        return 2;
    }
    const char *secret = getenv("HTTP_BENCH_SECRET");
    if (!secret || strncmp(secret, "whsec_", 6) != 0) {
        fprintf(stderr, "webhook_sink: HTTP_BENCH_SECRET must be whsec_<base64>\n");
        return 2;
    }
    key_len = EVP_DecodeBlock(key, (const unsigned char *)secret + 6, strlen(secret + 6));
    for (const char *p = secret + strlen(secret); p > secret + 6 && p[-1] == '='; p--)
        key_len--; /* EVP_DecodeBlock counts the padding's bytes */
    if (key_len <= 0)
        die("secret");

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 128) < 0)
        die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = malloc(sizeof *c);
                    if (!c)
                        die("malloc");
                    c->fd = fd;
                    c->len = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            ssize_t r = read(c->fd, c->buf + c->len, BUF_SIZE - 1 - c->len);
            if (r < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (r <= 0 || (c->len += r, serve(c) < 0)) {
                close(c->fd); /* closing the descriptor takes it out of the epoll set */
                free(c);
            }
        }
    }
}
