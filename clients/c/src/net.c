/*
 * net.c: the connection context, a thin I/O layer around the reply reader.
 *
 * The socket stays non-blocking; every wait is a poll(2) bounded by a
 * deadline, so a connect, a request write and a reply read each take at most
 * their timeout. A request is written as one buffer in one write loop, and
 * TCP_NODELAY is set: a request written in pieces meets Nagle's algorithm and
 * the peer's delayed ACK, which costs up to 40 ms per request on Linux.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* platforms without it set SO_NOSIGPIPE on the socket instead */
#endif

#define SG_DEFAULT_TIMEOUT_MS 10000
#define SG_READ_CHUNK 16384

ssize_t (*sg_send_hook)(int fd, const void *buf, size_t len, int flags) = send;

/* ---- errors -------------------------------------------------------------- */

static void set_error(smtpgate_ctx *c, int err, const char *fmt, ...)
{
    va_list ap;
    c->err = err;
    c->code[0] = '\0';
    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof c->errstr, fmt, ap);
    va_end(ap);
}

/* The daemon answered ERR CODE TEXT: the connection stays usable. */
static int server_error(smtpgate_ctx *c, const smtpgate_reply *reply)
{
    set_error(c, SMTPGATE_ERR_SERVER, "%s: %s", reply->code, reply->payload);
    snprintf(c->code, sizeof c->code, "%s", reply->code);
    return SMTPGATE_ERR;
}

static void clear_error(smtpgate_ctx *c)
{
    c->err = 0;
    c->errstr[0] = '\0';
    c->code[0] = '\0';
    c->request_sent = 0;
}

static void close_socket(smtpgate_ctx *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    smtpgate_reader_free(c->reader);
    c->reader = NULL;
}

/* A transport failure: the connection is out of step or gone, so it is closed. */
static int fail_io(smtpgate_ctx *c, int err, const char *what, int errnum)
{
    if (err == SMTPGATE_ERR_IO)
        set_error(c, err, "%s %s: %s", what, c->uri, strerror(errnum));
    else
        set_error(c, err, "%s %s", what, c->uri);
    close_socket(c);
    return SMTPGATE_ERR;
}

/* ---- time ---------------------------------------------------------------- */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for events on fd until deadline: >0 ready, 0 timed out, -1 error (errno). */
static int wait_fd(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {fd, events, 0};
        int n = poll(&p, 1, left > 0x7fffffff ? 0x7fffffff : (int)left);
        if (n < 0 && errno == EINTR)
            continue;
        return n;
    }
}

/* ---- connect ------------------------------------------------------------- */

static int set_socket_options(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return -1;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) /* a library's socket must not leak into exec'd children */
        return -1;
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
    return 0;
}

/* Non-blocking connect of a fresh socket, bounded by deadline. 0, or -1 with errno. */
static int connect_fd(int fd, const struct sockaddr *addr, socklen_t len, long long deadline)
{
    if (connect(fd, addr, len) == 0)
        return 0;
    if (errno != EINPROGRESS && errno != EINTR)
        return -1;
    int ready = wait_fd(fd, POLLOUT, deadline);
    if (ready == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    if (ready < 0)
        return -1;
    int soerr = 0;
    socklen_t l = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &l) < 0)
        return -1;
    if (soerr) {
        errno = soerr;
        return -1;
    }
    return 0;
}

static int connect_unix(smtpgate_ctx *c, const char *path, long long deadline)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (path[0] == '\0' || strlen(path) >= sizeof sa.sun_path) {
        set_error(c, SMTPGATE_ERR_INVALID, "bad unix socket path in %s", c->uri);
        return SMTPGATE_ERR;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || set_socket_options(fd) < 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return fail_io(c, SMTPGATE_ERR_IO, "connect", e);
    }
    if (connect_fd(fd, (struct sockaddr *)&sa, sizeof sa, deadline) < 0) {
        int e = errno;
        close(fd);
        if (e == ETIMEDOUT)
            return fail_io(c, SMTPGATE_ERR_TIMEOUT, "connect timed out:", 0);
        return fail_io(c, SMTPGATE_ERR_IO, "connect", e);
    }
    c->fd = fd;
    return SMTPGATE_OK;
}

static int connect_tcp(smtpgate_ctx *c, const char *hostport, long long deadline)
{
    char host[256];
    const char *port;
    const char *colon = strrchr(hostport, ':');
    if (colon == NULL || colon[1] == '\0' || (size_t)(colon - hostport) >= sizeof host) {
        set_error(c, SMTPGATE_ERR_INVALID, "expected tcp://HOST:PORT, got %s", c->uri);
        return SMTPGATE_ERR;
    }
    size_t hlen = (size_t)(colon - hostport);
    memcpy(host, hostport, hlen);
    host[hlen] = '\0';
    port = colon + 1;
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') { /* [::1]:2526 */
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = '\0';
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        set_error(c, SMTPGATE_ERR_IO, "resolve %s: %s", c->uri, gai_strerror(gai));
        return SMTPGATE_ERR;
    }
    int last_errno = ECONNREFUSED;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        if (set_socket_options(fd) < 0 || connect_fd(fd, ai->ai_addr, ai->ai_addrlen, deadline) < 0) {
            last_errno = errno;
            close(fd);
            if (last_errno == ETIMEDOUT)
                break;
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        break;
    }
    freeaddrinfo(res);
    if (c->fd >= 0)
        return SMTPGATE_OK;
    if (last_errno == ETIMEDOUT)
        return fail_io(c, SMTPGATE_ERR_TIMEOUT, "connect timed out:", 0);
    return fail_io(c, SMTPGATE_ERR_IO, "connect", last_errno);
}

/* Opens c->fd to c->uri and a fresh reader. */
static int open_connection(smtpgate_ctx *c)
{
    long long deadline = now_ms() + c->connect_timeout_ms;
    close_socket(c);
    int rc;
    if (strncmp(c->uri, "unix://", 7) == 0)
        rc = connect_unix(c, c->uri + 7, deadline);
    else if (strncmp(c->uri, "tcp://", 6) == 0)
        rc = connect_tcp(c, c->uri + 6, deadline);
    else {
        set_error(c, SMTPGATE_ERR_INVALID, "expected tcp://HOST:PORT or unix:///PATH, got %s",
                  c->uri);
        return SMTPGATE_ERR;
    }
    if (rc != SMTPGATE_OK)
        return rc;
    c->reader = smtpgate_reader_new(0);
    if (c->reader == NULL) {
        close_socket(c);
        set_error(c, SMTPGATE_ERR_OOM, "out of memory");
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

smtpgate_ctx *smtpgate_connect(const char *uri, int timeout_ms)
{
    smtpgate_ctx *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->fd = -1;
    c->connect_timeout_ms = c->io_timeout_ms = timeout_ms > 0 ? timeout_ms : SG_DEFAULT_TIMEOUT_MS;
    c->uri = strdup(uri ? uri : "");
    if (c->uri == NULL) {
        free(c);
        return NULL;
    }
    open_connection(c);
    return c;
}

static void wipe_token(smtpgate_ctx *c)
{
    if (c->token == NULL)
        return;
    /* volatile: the compiler may not drop stores to memory about to be freed */
    volatile char *p = c->token;
    while (*p)
        *p++ = '\0';
    free(c->token);
    c->token = NULL;
}

void smtpgate_free(smtpgate_ctx *c)
{
    if (c == NULL)
        return;
    close_socket(c);
    wipe_token(c);
    free(c->uri);
    free(c);
}

int smtpgate_set_timeout(smtpgate_ctx *c, int timeout_ms)
{
    if (timeout_ms <= 0) {
        set_error(c, SMTPGATE_ERR_INVALID, "timeout must be positive");
        return SMTPGATE_ERR;
    }
    c->io_timeout_ms = timeout_ms;
    return SMTPGATE_OK;
}

/* ---- one request, one reply ---------------------------------------------- */

static int write_all(smtpgate_ctx *c, const char *p, size_t n, long long deadline)
{
    while (n > 0) {
        ssize_t w = sg_send_hook(c->fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return fail_io(c, errno == EPIPE || errno == ECONNRESET ? SMTPGATE_ERR_EOF
                                                                    : SMTPGATE_ERR_IO,
                           errno == EPIPE || errno == ECONNRESET ? "connection closed by" : "write",
                           errno);
        int ready = wait_fd(c->fd, POLLOUT, deadline);
        if (ready == 0)
            return fail_io(c, SMTPGATE_ERR_TIMEOUT, "write timed out:", 0);
        if (ready < 0)
            return fail_io(c, SMTPGATE_ERR_IO, "poll", errno);
    }
    return SMTPGATE_OK;
}

static int read_reply(smtpgate_ctx *c, smtpgate_reply **out, long long deadline)
{
    char chunk[SG_READ_CHUNK];
    for (;;) {
        if (smtpgate_reader_get_reply(c->reader, out) != SMTPGATE_OK) {
            set_error(c, c->reader->err, "%s from %s", c->reader->errstr, c->uri);
            close_socket(c);
            return SMTPGATE_ERR;
        }
        if (*out != NULL)
            return SMTPGATE_OK;
        ssize_t n = recv(c->fd, chunk, sizeof chunk, 0);
        if (n > 0) {
            if (smtpgate_reader_feed(c->reader, chunk, (size_t)n) != SMTPGATE_OK) {
                set_error(c, c->reader->err, "%s", c->reader->errstr);
                close_socket(c);
                return SMTPGATE_ERR;
            }
            continue;
        }
        if (n == 0)
            return fail_io(c, SMTPGATE_ERR_EOF, "connection closed by", 0);
        if (errno == EINTR)
            continue;
        if (errno == ECONNRESET)
            return fail_io(c, SMTPGATE_ERR_EOF, "connection reset by", 0);
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return fail_io(c, SMTPGATE_ERR_IO, "read", errno);
        int ready = wait_fd(c->fd, POLLIN, deadline);
        if (ready == 0)
            return fail_io(c, SMTPGATE_ERR_TIMEOUT, "read timed out:", 0);
        if (ready < 0)
            return fail_io(c, SMTPGATE_ERR_IO, "poll", errno);
    }
}

/* True when the idle connection can carry a request: nothing arrived since
 * the last reply. EOF means the daemon closed it (idle timeout, restart);
 * unsolicited bytes would be taken as the next request's reply, so either way
 * the connection is dropped and opened again. */
static int connection_fresh(smtpgate_ctx *c)
{
    struct pollfd p = {c->fd, POLLIN, 0};
    if (poll(&p, 1, 0) == 0)
        return c->reader->len == c->reader->pos;
    return 0;
}

static int request_raw(smtpgate_ctx *c, const char *req, size_t len, int extra_ms,
                       smtpgate_reply **out);

/* AUTH with c->token on the open connection; an ERR reply becomes SMTPGATE_ERR_SERVER. */
static int auth_request(smtpgate_ctx *c)
{
    sg_buf line = {0};
    smtpgate_reply *reply = NULL;
    sg_buf_puts(&line, "AUTH ");
    sg_buf_puts(&line, c->token);
    sg_buf_putc(&line, '\n');
    int rc;
    if (line.oom) {
        set_error(c, SMTPGATE_ERR_OOM, "out of memory");
        rc = SMTPGATE_ERR;
    } else
        rc = request_raw(c, line.data, line.len, 0, &reply);
    if (line.data)
        memset(line.data, 0, line.len); /* the token */
    sg_buf_free(&line);
    if (rc == SMTPGATE_OK && reply->type == SMTPGATE_REPLY_ERR)
        rc = server_error(c, reply);
    smtpgate_reply_free(reply);
    return rc;
}

/* Makes c->fd usable for the next request: (re)connects and repeats AUTH when
 * the connection is gone or out of step. *opened (if not NULL) tells whether it did. */
static int ensure_connected(smtpgate_ctx *c, int *opened)
{
    if (opened)
        *opened = 0;
    if (c->fd >= 0 && connection_fresh(c))
        return SMTPGATE_OK;
    if (opened)
        *opened = 1;
    if (open_connection(c) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    return c->token != NULL ? auth_request(c) : SMTPGATE_OK;
}

/* Writes one complete request line and reads its reply (ERR replies included).
 * c->request_sent is set once the line is out whole: from then on the daemon
 * may act on it, whatever happens to the reply. A line cut short (its LF not
 * written) is no request. */
static int request_raw(smtpgate_ctx *c, const char *req, size_t len, int extra_ms,
                       smtpgate_reply **out)
{
    long long deadline = now_ms() + c->io_timeout_ms;
    if (write_all(c, req, len, deadline) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    c->request_sent = 1;
    return read_reply(c, out, deadline + extra_ms);
}

/* Connects if needed, sends req (a whole line with its LF), and returns the OK
 * reply in *out; an ERR reply becomes SMTPGATE_ERR_SERVER. A repeatable
 * request (one whose effect does not double: PING, STATUS, WAIT, a SEND with
 * an idempotency key) is sent once more on a new connection when the daemon
 * closed the reused one under it: its idle timer and our write crossed. */
static int request(smtpgate_ctx *c, const char *req, size_t len, int extra_ms, int repeatable,
                   smtpgate_reply **out)
{
    int opened;
    clear_error(c);
    *out = NULL;
    int rc = ensure_connected(c, &opened);
    c->request_sent = 0; /* the AUTH of a reconnect is not this request */
    if (rc != SMTPGATE_OK)
        return SMTPGATE_ERR;
    rc = request_raw(c, req, len, extra_ms, out);
    if (rc != SMTPGATE_OK && repeatable && !opened && c->err == SMTPGATE_ERR_EOF) {
        clear_error(c);
        rc = ensure_connected(c, NULL);
        c->request_sent = 1; /* the first copy went out */
        if (rc != SMTPGATE_OK)
            return SMTPGATE_ERR;
        rc = request_raw(c, req, len, extra_ms, out);
    }
    if (rc != SMTPGATE_OK)
        return SMTPGATE_ERR;
    if ((*out)->type == SMTPGATE_REPLY_ERR) {
        server_error(c, *out);
        smtpgate_reply_free(*out);
        *out = NULL;
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

/* Ends the request in req with its LF, sends it (see request) and frees req. */
static int request_buf(smtpgate_ctx *c, sg_buf *req, int repeatable, smtpgate_reply **out)
{
    int rc;
    *out = NULL;
    sg_buf_putc(req, '\n');
    if (req->oom) {
        set_error(c, SMTPGATE_ERR_OOM, "out of memory");
        rc = SMTPGATE_ERR;
    } else
        rc = request(c, req->data, req->len, 0, repeatable, out);
    sg_buf_free(req);
    return rc;
}

int smtpgate_reconnect(smtpgate_ctx *c)
{
    clear_error(c);
    close_socket(c);
    return ensure_connected(c, NULL);
}

/* Refuses a request argument that could end the line early or add a second request. */
static int check_line(smtpgate_ctx *c, const char *what, const char *s)
{
    if (s == NULL || s[0] == '\0' || strpbrk(s, "\r\n") != NULL) {
        set_error(c, SMTPGATE_ERR_INVALID, "%s: empty or contains CR/LF", what);
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

/* An id is what the daemon gave: printable ASCII without spaces. */
static int check_id(smtpgate_ctx *c, const char *id)
{
    size_t n = id ? strlen(id) : 0;
    if (n == 0 || n >= SMTPGATE_ID_SIZE)
        goto bad;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)id[i] <= 0x20 || (unsigned char)id[i] >= 0x7f)
            goto bad;
    return SMTPGATE_OK;
bad:
    set_error(c, SMTPGATE_ERR_INVALID, "not a message id");
    return SMTPGATE_ERR;
}

int smtpgate_command(smtpgate_ctx *c, const char *line, char **payload)
{
    if (payload)
        *payload = NULL;
    clear_error(c);
    if (check_line(c, "request", line) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    sg_buf req = {0};
    sg_buf_puts(&req, line);
    smtpgate_reply *reply = NULL;
    int rc = request_buf(c, &req, 0, &reply); /* any verb: not known to be repeatable */
    if (rc == SMTPGATE_OK && payload) {
        *payload = reply->payload; /* hand the payload over instead of copying it */
        reply->payload = NULL;
    }
    smtpgate_reply_free(reply);
    return rc;
}

int smtpgate_auth(smtpgate_ctx *c, const char *token)
{
    clear_error(c);
    if (token == NULL || token[0] == '\0' || strpbrk(token, "\r\n ") != NULL) {
        set_error(c, SMTPGATE_ERR_INVALID, "token: empty or contains CR, LF or space");
        return SMTPGATE_ERR;
    }
    char *copy = strdup(token);
    if (copy == NULL) {
        set_error(c, SMTPGATE_ERR_OOM, "out of memory");
        return SMTPGATE_ERR;
    }
    wipe_token(c);
    c->token = copy;
    /* An open connection needs AUTH now; a new one authenticates in ensure_connected. */
    int rc = c->fd >= 0 && connection_fresh(c) ? auth_request(c) : ensure_connected(c, NULL);
    /* A refused token is not repeated on reconnect. Any other ERR (the BUSY of
     * a daemon at its connection limit, INTERNAL) says nothing of the token:
     * dropping it would leave every later request AUTH_REQUIRED. */
    if (rc != SMTPGATE_OK && c->err == SMTPGATE_ERR_SERVER && strcmp(c->code, "AUTH_FAILED") == 0)
        wipe_token(c);
    return rc;
}

int smtpgate_ping(smtpgate_ctx *c)
{
    smtpgate_reply *reply = NULL;
    int rc = request(c, "PING\n", 5, 0, 1, &reply);
    if (rc == SMTPGATE_OK && strcmp(reply->payload, "PONG") != 0) {
        set_error(c, SMTPGATE_ERR_PROTOCOL, "PING answered \"OK %.60s\" by %s", reply->payload,
                  c->uri);
        rc = SMTPGATE_ERR;
    }
    smtpgate_reply_free(reply);
    return rc;
}

/* The caller's id buffer, checked before a SEND is written: once the daemon
 * has answered, the message is stored, and an id that does not fit would be
 * an error the caller retries (a second copy). Any id check_id accepts fits. */
static int check_id_buffer(smtpgate_ctx *c, const char *id, size_t idlen)
{
    if (id == NULL || idlen < SMTPGATE_ID_SIZE) {
        set_error(c, SMTPGATE_ERR_INVALID, "id buffer: NULL or under SMTPGATE_ID_SIZE (%d) bytes",
                  SMTPGATE_ID_SIZE);
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

/* Sends "SEND <json>" held in req (freed) and copies the id from "OK <id>"
 * into id (checked by check_id_buffer). */
static int send_line(smtpgate_ctx *c, sg_buf *req, int repeatable, char *id)
{
    smtpgate_reply *reply = NULL;
    int rc = request_buf(c, req, repeatable, &reply);
    if (rc != SMTPGATE_OK)
        return rc;
    if (check_id(c, reply->payload) != SMTPGATE_OK) {
        set_error(c, SMTPGATE_ERR_PROTOCOL, "SEND answered \"OK %.60s\" by %s", reply->payload,
                  c->uri);
        rc = SMTPGATE_ERR;
    } else
        memcpy(id, reply->payload, reply->len + 1); /* reply->len < SMTPGATE_ID_SIZE */
    smtpgate_reply_free(reply);
    return rc;
}

int smtpgate_send(smtpgate_ctx *c, const smtpgate_msg *m, char *id, size_t idlen)
{
    clear_error(c);
    if (check_id_buffer(c, id, idlen) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    sg_buf req = {0};
    char why[SMTPGATE_ERRSTR_SIZE];
    sg_buf_puts(&req, "SEND ");
    if (sg_msg_write_json(m, &req, why) != SMTPGATE_OK) {
        set_error(c, req.oom ? SMTPGATE_ERR_OOM : SMTPGATE_ERR_INVALID, "%s", why);
        sg_buf_free(&req);
        return SMTPGATE_ERR;
    }
    return send_line(c, &req, sg_msg_has_idempotency_key(m), id);
}

int smtpgate_send_json(smtpgate_ctx *c, const char *json, char *id, size_t idlen)
{
    clear_error(c);
    if (check_line(c, "json", json) != SMTPGATE_OK || check_id_buffer(c, id, idlen) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    sg_buf req = {0};
    sg_buf_puts(&req, "SEND ");
    sg_buf_puts(&req, json);
    return send_line(c, &req, 0, id);
}

/* STATUS or WAIT: the line is built by the caller; the state comes from the payload. */
static int state_request(smtpgate_ctx *c, const char *line, size_t len, int extra_ms,
                         smtpgate_state *state, char **json)
{
    smtpgate_reply *reply = NULL;
    if (json)
        *json = NULL;
    if (state)
        *state = SMTPGATE_STATE_UNKNOWN;
    int rc = request(c, line, len, extra_ms, 1, &reply);
    if (rc != SMTPGATE_OK)
        return rc;
    char name[32];
    if (smtpgate_json_get_string(reply->payload, "state", name, sizeof name) != SMTPGATE_OK) {
        set_error(c, SMTPGATE_ERR_PROTOCOL, "no \"state\" in the reply of %s", c->uri);
        smtpgate_reply_free(reply);
        return SMTPGATE_ERR;
    }
    if (state)
        *state = smtpgate_state_parse(name);
    if (json) {
        *json = reply->payload;
        reply->payload = NULL;
    }
    smtpgate_reply_free(reply);
    return SMTPGATE_OK;
}

int smtpgate_status(smtpgate_ctx *c, const char *id, smtpgate_state *state, char **json)
{
    clear_error(c);
    if (check_id(c, id) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    char line[SMTPGATE_ID_SIZE + 16];
    int n = snprintf(line, sizeof line, "STATUS %s\n", id);
    return state_request(c, line, (size_t)n, 0, state, json);
}

int smtpgate_wait(smtpgate_ctx *c, const char *id, int seconds, smtpgate_state *state,
                  char **json)
{
    clear_error(c);
    if (check_id(c, id) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    if (seconds < 0 || seconds > 86400) {
        set_error(c, SMTPGATE_ERR_INVALID, "wait seconds out of range 0..86400");
        return SMTPGATE_ERR;
    }
    char line[SMTPGATE_ID_SIZE + 32];
    int n = snprintf(line, sizeof line, "WAIT %s %d\n", id, seconds);
    return state_request(c, line, (size_t)n, seconds * 1000, state, json);
}

static const char *const state_names[] = {"unknown", "queued", "sending",
                                          "deferred", "sent", "failed"};

const char *smtpgate_state_name(smtpgate_state s)
{
    if ((int)s < 0 || (size_t)s >= sizeof state_names / sizeof state_names[0])
        return "unknown";
    return state_names[s];
}

smtpgate_state smtpgate_state_parse(const char *name)
{
    for (size_t i = 1; i < sizeof state_names / sizeof state_names[0]; i++)
        if (strcmp(name, state_names[i]) == 0)
            return (smtpgate_state)i;
    return SMTPGATE_STATE_UNKNOWN;
}
