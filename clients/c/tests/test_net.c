/* test_net.c: the context over a real Unix socket. The library's send hook
 * plays the daemon: it passes every write on to the socket, drains the
 * server end into `wire` (the bytes a daemon would have read), and for each
 * complete request line writes the next scripted reply. One thread, no timing. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static int listener = -1, server = -1, accepted;
static char uri[128], sock_path[108];
static sg_buf wire;                 /* bytes the server end received, all connections */
static size_t lines_answered;       /* complete lines in wire that got their reply */
static const char *script[8];       /* replies, one per request line; NULL: stay silent */
static size_t script_len, script_pos;
static int send_calls;              /* calls of the hook that carried bytes */
static size_t max_chunk;            /* 0: pass writes whole; else accept at most this many bytes */
static int close_after_request;     /* requests to drop: close the server end instead of answering */

static void reset(const char **replies, size_t n)
{
    wire.len = 0;
    if (wire.data)
        wire.data[0] = '\0';
    lines_answered = 0;
    for (size_t i = 0; i < n; i++)
        script[i] = replies[i];
    script_len = n;
    script_pos = 0;
    send_calls = 0;
    max_chunk = 0;
    close_after_request = 0;
}

static void accept_client(void)
{
    if (server >= 0)
        close(server);
    server = accept(listener, NULL, NULL);
    fcntl(server, F_SETFL, fcntl(server, F_GETFL) | O_NONBLOCK);
    accepted++;
}

static ssize_t fake_daemon(int fd, const void *buf, size_t len, int flags)
{
    struct pollfd p = {listener, POLLIN, 0};
    if (poll(&p, 1, 0) == 1)
        accept_client(); /* the library reconnected: the new connection waits in the backlog */
    size_t n = max_chunk && len > max_chunk ? max_chunk : len;
    ssize_t w = send(fd, buf, n, flags);
    if (w > 0)
        send_calls++;
    char chunk[65536];
    ssize_t r;
    while ((r = recv(server, chunk, sizeof chunk, 0)) > 0)
        sg_buf_append(&wire, chunk, (size_t)r);
    size_t lines = 0;
    for (size_t i = 0; i < wire.len; i++)
        lines += wire.data[i] == '\n';
    for (; lines_answered < lines; lines_answered++) {
        if (close_after_request > 0) {
            close_after_request--;
            close(server);
            server = -1;
            lines_answered++; /* consumed without a reply */
            break;
        }
        if (script_pos < script_len && script[script_pos] != NULL) {
            const char *reply = script[script_pos];
            CHECK(write(server, reply, strlen(reply)) == (ssize_t)strlen(reply));
        }
        script_pos++;
    }
    return w;
}

static smtpgate_ctx *connect_fake(void)
{
    smtpgate_ctx *c = smtpgate_connect(uri, 2000);
    CHECK(c != NULL && c->err == 0 && c->fd >= 0);
    accept_client();
    return c;
}

#define SCRIPT(...)                                                                    \
    do {                                                                               \
        const char *r_[] = {__VA_ARGS__};                                              \
        reset(r_, sizeof r_ / sizeof r_[0]);                                           \
    } while (0)

static void test_ping_is_one_write(void)
{
    smtpgate_ctx *c = connect_fake();
    SCRIPT("OK PONG\r\n");
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK(c->err == 0);
    CHECK_STR(wire.data, "PING\n");
    CHECK(send_calls == 1);
    smtpgate_free(c);
}

static smtpgate_msg *utf8_message(void)
{
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "app@example.com");
    smtpgate_msg_add_to(m, "kelly@example.org");
    smtpgate_msg_set_subject(m, "记得收衣服");
    smtpgate_msg_set_text(m, "今天我不回家\n");
    return m;
}

static void test_send_writes_one_line_and_returns_the_id(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_msg *m = utf8_message();
    char id[SMTPGATE_ID_SIZE] = "";
    SCRIPT("OK 01JD3Q7Z8K4W6X2V9N5B0C1T\r\n");
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_OK);
    CHECK_STR(id, "01JD3Q7Z8K4W6X2V9N5B0C1T");
    CHECK_STR(wire.data, "SEND {\"from\":\"app@example.com\",\"to\":[\"kelly@example.org\"],"
                         "\"subject\":\"记得收衣服\",\"text\":\"今天我不回家\\n\"}\n");
    CHECK(send_calls == 1);
    /* An id buffer too small (or none) is the caller's error, found before
     * the SEND is written: afterwards the message would be stored already. */
    SCRIPT("OK 01JD3Q7Z8K4W6X2V9N5B0C1T\r\n");
    CHECK(smtpgate_send(c, m, id, 10) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID && !c->request_sent);
    CHECK(smtpgate_send(c, m, NULL, SMTPGATE_ID_SIZE) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK(smtpgate_send_json(c, "{}", id, SMTPGATE_ID_SIZE - 1) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK(wire.len == 0 && send_calls == 0);
    smtpgate_msg_free(m);
    smtpgate_free(c);
}

static void test_short_writes_are_completed(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_msg *m = utf8_message();
    static char blob[300000];
    for (size_t i = 0; i < sizeof blob; i++)
        blob[i] = (char)(i * 7);
    smtpgate_msg_attach(m, "blob.bin", NULL, NULL, blob, sizeof blob);
    char *json = smtpgate_msg_json(m, NULL);
    char id[SMTPGATE_ID_SIZE];
    SCRIPT("OK X1\r\n");
    max_chunk = 4093; /* the kernel takes part of a write: the loop must go on */
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_OK);
    CHECK_STR(id, "X1");
    CHECK(wire.len == 5 + strlen(json) + 1);
    CHECK(wire.len > 5 && memcmp(wire.data, "SEND ", 5) == 0 &&
          memcmp(wire.data + 5, json, strlen(json)) == 0 && wire.data[wire.len - 1] == '\n');
    CHECK(send_calls > 1);
    free(json);
    smtpgate_msg_free(m);
    smtpgate_free(c);
}

static void test_server_error_keeps_the_connection(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_msg *m = utf8_message();
    char id[SMTPGATE_ID_SIZE];
    int fd = c->fd;
    SCRIPT("ERR BAD_ADDRESS not an address: x\r\n", "OK PONG\r\n");
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_SERVER);
    CHECK_STR(c->code, "BAD_ADDRESS");
    CHECK_STR(c->errstr, "BAD_ADDRESS: not an address: x");
    CHECK(c->fd == fd);
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK(c->err == 0 && c->code[0] == '\0' && c->fd == fd);
    smtpgate_msg_free(m);
    smtpgate_free(c);
}

static void test_transport_failures_close_the_connection(void)
{
    smtpgate_ctx *c = connect_fake();
    SCRIPT("HTTP/1.1 400 Bad Request\r\n");
    CHECK(smtpgate_ping(c) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_PROTOCOL);
    CHECK(strstr(c->errstr, "unexpected reply") != NULL);
    CHECK(c->fd == -1);
    smtpgate_free(c);

    c = connect_fake();
    SCRIPT("OK\r\n");
    close_after_request = 1;
    CHECK(smtpgate_command(c, "NOOP", NULL) == SMTPGATE_ERR); /* not known to be repeatable */
    CHECK(c->err == SMTPGATE_ERR_EOF);
    CHECK(c->fd == -1);
    smtpgate_free(c);

    c = connect_fake();
    SCRIPT(NULL); /* the daemon never answers */
    smtpgate_set_timeout(c, 50);
    CHECK(smtpgate_ping(c) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_TIMEOUT);
    CHECK(c->fd == -1);
    smtpgate_free(c);
}

static void test_reconnects_after_idle_close_and_unsolicited_bytes(void)
{
    smtpgate_ctx *c = connect_fake();
    SCRIPT("OK\r\n", "OK PONG\r\n", "OK\r\n", "OK PONG\r\n");
    CHECK(smtpgate_auth(c, "s3cret") == SMTPGATE_OK);
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    /* The daemon closes the idle connection: the next request reconnects and
     * authenticates again before it goes out. */
    close(server);
    server = -1;
    int before = accepted;
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK(accepted == before + 1);
    CHECK_STR(wire.data, "AUTH s3cret\nPING\nAUTH s3cret\nPING\n");
    /* Bytes nobody asked for would pass as the next reply: drop and reconnect. */
    SCRIPT("OK\r\n", "OK PONG\r\n");
    CHECK(write(server, "OK stale\r\n", 10) == 10);
    before = accepted;
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK(accepted == before + 1);
    CHECK(c->err == 0);
    smtpgate_free(c);
}

static void test_close_racing_a_request_repeats_only_what_is_safe(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_msg *m = utf8_message();
    char id[SMTPGATE_ID_SIZE];
    /* The daemon's idle timer fires as the request goes out: the request is lost. */
    SCRIPT("OK PONG\r\n");
    close_after_request = 1;
    int before = accepted;
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK(accepted == before + 1);
    CHECK_STR(wire.data, "PING\nPING\n");
    /* A SEND without an idempotency key might have been stored: not repeated. */
    SCRIPT("OK X1\r\n");
    close_after_request = 1;
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_EOF);
    CHECK(send_calls == 1);
    CHECK(c->request_sent); /* it went out: the caller must not send it elsewhere */
    /* With a key a repeat queues nothing new, so it is sent again. */
    smtpgate_msg_set_idempotency_key(m, "k-1");
    SCRIPT("OK PONG\r\n", "OK X1\r\n");
    CHECK(smtpgate_ping(c) == SMTPGATE_OK); /* a new connection, then reused */
    close_after_request = 1;
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_OK);
    CHECK_STR(id, "X1");
    CHECK(send_calls == 3); /* PING, SEND, SEND again */
    smtpgate_msg_free(m);
    smtpgate_free(c);
}

static void test_refused_token_is_not_repeated(void)
{
    smtpgate_ctx *c = connect_fake();
    SCRIPT("ERR AUTH_FAILED wrong token\r\n", "ERR AUTH_REQUIRED auth first\r\n");
    CHECK(smtpgate_auth(c, "hunter2") == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_SERVER);
    CHECK_STR(c->code, "AUTH_FAILED");
    CHECK_STR(c->errstr, "AUTH_FAILED: wrong token"); /* the token itself never shows */
    close(server);
    server = -1;
    CHECK(smtpgate_ping(c) == SMTPGATE_ERR);
    CHECK_STR(c->code, "AUTH_REQUIRED");
    CHECK_STR(wire.data, "AUTH hunter2\nPING\n");
    smtpgate_free(c);
}

static void test_busy_at_auth_keeps_the_token(void)
{
    smtpgate_ctx *c = connect_fake();
    /* A daemon at its connection limit answers BUSY and closes: the token
     * was never judged, so the next connection authenticates with it. */
    SCRIPT("ERR BUSY too many connections, try again later\r\n", "OK\r\n", "OK PONG\r\n");
    CHECK(smtpgate_auth(c, "s3cret") == SMTPGATE_ERR);
    CHECK_STR(c->code, "BUSY");
    close(server);
    server = -1;
    CHECK(smtpgate_ping(c) == SMTPGATE_OK);
    CHECK_STR(wire.data, "AUTH s3cret\nAUTH s3cret\nPING\n");
    smtpgate_free(c);
}

static void test_status_and_wait(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_state state;
    char *json = NULL;
    SCRIPT("OK {\"id\":\"X1\",\"state\":\"deferred\",\"attempts\":2,\"recipients\":[]}\r\n",
           "OK {\"id\":\"X1\",\"state\":\"sent\"}\r\n", "ERR NOT_FOUND no such message\r\n",
           "OK {\"id\":\"X1\"}\r\n");
    CHECK(smtpgate_status(c, "X1", &state, &json) == SMTPGATE_OK);
    CHECK(state == SMTPGATE_STATE_DEFERRED);
    CHECK_STR(json, "{\"id\":\"X1\",\"state\":\"deferred\",\"attempts\":2,\"recipients\":[]}");
    free(json);
    CHECK(smtpgate_wait(c, "X1", 5, &state, NULL) == SMTPGATE_OK);
    CHECK(state == SMTPGATE_STATE_SENT);
    CHECK_STR(smtpgate_state_name(state), "sent");
    CHECK(smtpgate_status(c, "NOPE", &state, NULL) == SMTPGATE_ERR);
    CHECK_STR(c->code, "NOT_FOUND");
    CHECK(smtpgate_status(c, "X1", &state, NULL) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_PROTOCOL);
    CHECK_STR(wire.data, "STATUS X1\nWAIT X1 5\nSTATUS NOPE\nSTATUS X1\n");
    smtpgate_free(c);
}

static void test_injection_is_refused_before_sending(void)
{
    smtpgate_ctx *c = connect_fake();
    smtpgate_state state;
    char id[SMTPGATE_ID_SIZE];
    SCRIPT("OK\r\n");
    CHECK(smtpgate_command(c, "PING\r\nQUIT", NULL) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK(smtpgate_status(c, "X1 \nQUIT", &state, NULL) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK(smtpgate_auth(c, "tok\nQUIT") == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK(smtpgate_send_json(c, "{}\nQUIT", id, sizeof id) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_subject(m, "\xc3(");
    CHECK(smtpgate_send(c, m, id, sizeof id) == SMTPGATE_ERR);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    CHECK_STR(c->errstr, "subject: invalid UTF-8 at byte 0");
    CHECK(send_calls == 0);
    char *payload = NULL;
    CHECK(smtpgate_command(c, "NOOP", &payload) == SMTPGATE_OK);
    CHECK_STR(payload, "");
    CHECK_STR(wire.data, "NOOP\n");
    free(payload);
    smtpgate_msg_free(m);
    smtpgate_free(c);
}

static void test_connect_failures(void)
{
    smtpgate_ctx *c = smtpgate_connect("unix:///nonexistent/smtpgate.sock", 500);
    CHECK(c->err == SMTPGATE_ERR_IO && c->fd == -1);
    CHECK_STR(c->errstr, "connect unix:///nonexistent/smtpgate.sock: No such file or directory");
    smtpgate_free(c);
    c = smtpgate_connect("http://127.0.0.1:2526", 500);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    smtpgate_free(c);
    c = smtpgate_connect("tcp://127.0.0.1", 500);
    CHECK(c->err == SMTPGATE_ERR_INVALID);
    smtpgate_free(c);
}

int main(void)
{
    char dir[] = "/tmp/sgnetXXXXXX";
    if (mkdtemp(dir) == NULL)
        return 2;
    snprintf(sock_path, sizeof sock_path, "%s/s", dir);
    snprintf(uri, sizeof uri, "unix://%s", sock_path);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
    listener = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(listener, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listener, 8) != 0)
        return 2;
    sg_send_hook = fake_daemon;

    RUN(test_ping_is_one_write);
    RUN(test_send_writes_one_line_and_returns_the_id);
    RUN(test_short_writes_are_completed);
    RUN(test_server_error_keeps_the_connection);
    RUN(test_transport_failures_close_the_connection);
    RUN(test_reconnects_after_idle_close_and_unsolicited_bytes);
    RUN(test_close_racing_a_request_repeats_only_what_is_safe);
    RUN(test_refused_token_is_not_repeated);
    RUN(test_busy_at_auth_keeps_the_token);
    RUN(test_status_and_wait);
    RUN(test_injection_is_refused_before_sending);
    RUN(test_connect_failures);

    if (server >= 0)
        close(server);
    close(listener);
    unlink(sock_path);
    rmdir(dir);
    sg_buf_free(&wire);
    return TEST_RESULT();
}
