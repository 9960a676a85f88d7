/*
 * Hand-off latency of one mail from C: run by bench/c_handoff.py, which builds
 * this against clients/c/build/libsmtpgate.a, starts the daemon and the
 * upstream, and turns the figures into p50/p99.
 *
 *     c_handoff MODE COUNT TARGET [SMTPGATE_SEND]
 *
 * MODE (TARGET):
 *   gate_connect (daemon URI)  smtpgate_connect + smtpgate_send + smtpgate_free per mail
 *   gate_open    (daemon URI)  smtpgate_send on one open connection
 *   ping_open    (daemon URI)  smtpgate_ping on one open connection: the round-trip
 *                              floor of client + daemon without storing anything
 *   cli          (daemon URI)  one smtpgate-send process per mail (what a shell or
 *                              monitoring script pays): spawn until exit status
 *   smtp_connect (host:port)   a direct SMTP conversation per mail to the upstream:
 *                              greeting, EHLO, MAIL, RCPT, DATA, message + dot in one
 *                              write; the clock stops at the 250 after the dot (QUIT untimed)
 *   smtp_open    (host:port)   the same, MAIL..dot per mail on one connection
 *
 * Prints one JSON object: {"mode", "count", "latencies_us": [...], "starts_us": [...]},
 * each start on CLOCK_MONOTONIC (bench/handoff_trace.py lines SENDs up with a trace).
 * The mail is the one bench/php_handoff.php sends: a UTF-8 subject and ~1 KiB of text.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "smtpgate.h"

#define WARMUP 20
#define FROM "app@example.com"
#define TO "kelly@example.org"
#define SUBJECT "记得收衣服"
#define LINE "今天我不回家，晚饭自己吃。 0123456789\n"

extern char **environ;
static char body[4096];

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "c_handoff: %s: %s\n", what, why);
    exit(1);
}

static smtpgate_msg *message(void)
{
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, FROM);
    smtpgate_msg_add_to(m, TO);
    smtpgate_msg_set_subject(m, SUBJECT);
    smtpgate_msg_set_text(m, body);
    return m;
}

/* ---- the direct SMTP side (RFC 5321), written correctly: multi-line replies read
 * to their last line (4.2.1), the whole message and its dot in one write ---------- */

struct smtp {
    int fd;
    char buf[8192];
    size_t len;
};

/* Reads one reply, all its lines; returns its code. */
static int smtp_reply(struct smtp *s)
{
    for (;;) {
        char *lf;
        while ((lf = memchr(s->buf, '\n', s->len)) == NULL) {
            ssize_t n = read(s->fd, s->buf + s->len, sizeof s->buf - s->len);
            if (n <= 0)
                die("smtp", "connection closed");
            s->len += (size_t)n;
        }
        size_t line = (size_t)(lf - s->buf) + 1;
        int last = line >= 4 && s->buf[3] != '-';
        int code = atoi(s->buf);
        memmove(s->buf, s->buf + line, s->len - line);
        s->len -= line;
        if (last)
            return code;
    }
}

static void smtp_cmd(struct smtp *s, const char *cmd, int want)
{
    size_t n = strlen(cmd);
    if (write(s->fd, cmd, n) != (ssize_t)n)
        die("smtp", "write");
    int code = smtp_reply(s);
    if (code != want) {
        char why[64];
        snprintf(why, sizeof why, "%d after %.20s", code, cmd);
        die("smtp", why);
    }
}

static void smtp_open(struct smtp *s, const char *hostport)
{
    char host[64];
    const char *colon = strrchr(hostport, ':');
    snprintf(host, sizeof host, "%.*s", (int)(colon - hostport), hostport);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(colon + 1));
    inet_pton(AF_INET, host, &sa.sin_addr);
    s->len = 0;
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s->fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die("smtp connect", hostport);
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (smtp_reply(s) != 220)
        die("smtp", "greeting");
    smtp_cmd(s, "EHLO bench.test\r\n", 250);
}

static char smtp_data[8192];

static void smtp_mail(struct smtp *s)
{
    smtp_cmd(s, "MAIL FROM:<" FROM ">\r\n", 250);
    smtp_cmd(s, "RCPT TO:<" TO ">\r\n", 250);
    smtp_cmd(s, "DATA\r\n", 354);
    smtp_cmd(s, smtp_data, 250);
}

static void smtp_close(struct smtp *s)
{
    smtp_cmd(s, "QUIT\r\n", 221);
    close(s->fd);
}

/* The message as it goes after DATA: headers, CRLF lines, the final dot. */
static void build_smtp_data(void)
{
    size_t o = (size_t)snprintf(smtp_data, sizeof smtp_data,
                                "From: " FROM "\r\nTo: " TO "\r\n"
                                "Subject: =?utf-8?b?6K6w5b6X5pS26KGj5pyN?=\r\n"
                                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                "Content-Transfer-Encoding: 8bit\r\n\r\n");
    for (const char *p = body; *p; p++) {
        if (*p == '\n')
            smtp_data[o++] = '\r';
        smtp_data[o++] = *p;
    }
    memcpy(smtp_data + o, ".\r\n", 4);
}

int main(int argc, char **argv)
{
    if (argc < 4)
        die("usage", "c_handoff MODE COUNT TARGET [SMTPGATE_SEND]");
    const char *mode = argv[1], *target = argv[3];
    int count = atoi(argv[2]);
    for (int i = 0; i < 24; i++)
        strcat(body, LINE);
    build_smtp_data();

    double *lat = calloc((size_t)count, sizeof *lat);
    double *starts = calloc((size_t)count, sizeof *starts);
    smtpgate_msg *m = message();
    smtpgate_ctx *open_ctx = NULL;
    struct smtp open_smtp;
    char id[SMTPGATE_ID_SIZE];
    if (strcmp(mode, "gate_open") == 0 || strcmp(mode, "ping_open") == 0) {
        open_ctx = smtpgate_connect(target, 10000);
        if (open_ctx->err)
            die(target, open_ctx->errstr);
    } else if (strcmp(mode, "smtp_open") == 0)
        smtp_open(&open_smtp, target);

    /* The body file for the cli mode's stdin. */
    char body_path[] = "/tmp/c_handoff_bodyXXXXXX";
    int body_fd = -1;
    if (strcmp(mode, "cli") == 0) {
        if (argc < 5)
            die("cli", "needs the smtpgate-send path");
        body_fd = mkstemp(body_path);
        if (write(body_fd, body, strlen(body)) != (ssize_t)strlen(body))
            die("cli", "body file");
    }

    for (int i = -WARMUP; i < count; i++) {
        double start = now_us();
        if (strcmp(mode, "gate_connect") == 0) {
            smtpgate_ctx *c = smtpgate_connect(target, 10000);
            if (c->err || smtpgate_send(c, m, id, sizeof id) != SMTPGATE_OK)
                die(target, c->errstr);
            smtpgate_free(c);
        } else if (strcmp(mode, "gate_open") == 0) {
            if (smtpgate_send(open_ctx, m, id, sizeof id) != SMTPGATE_OK)
                die(target, open_ctx->errstr);
        } else if (strcmp(mode, "ping_open") == 0) {
            if (smtpgate_ping(open_ctx) != SMTPGATE_OK)
                die(target, open_ctx->errstr);
        } else if (strcmp(mode, "cli") == 0) {
            posix_spawn_file_actions_t fa;
            posix_spawn_file_actions_init(&fa);
            lseek(body_fd, 0, SEEK_SET);
            posix_spawn_file_actions_adddup2(&fa, body_fd, 0);
            posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
            char *args[] = {argv[4], "--server", (char *)target, "-f", FROM, "-t", TO,
                            "-s", SUBJECT, NULL};
            pid_t pid;
            int status;
            if (posix_spawn(&pid, argv[4], &fa, NULL, args, environ) != 0)
                die("spawn", argv[4]);
            waitpid(pid, &status, 0);
            posix_spawn_file_actions_destroy(&fa);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                die("smtpgate-send", "did not exit 0");
        } else if (strcmp(mode, "smtp_connect") == 0) {
            struct smtp s;
            smtp_open(&s, target);
            smtp_mail(&s);
            double stop = now_us();
            smtp_close(&s); /* QUIT is not timed: the mail is handed over at the 250 */
            if (i >= 0) {
                lat[i] = stop - start;
                starts[i] = start;
            }
            continue;
        } else if (strcmp(mode, "smtp_open") == 0) {
            smtp_mail(&open_smtp);
        } else
            die("unknown mode", mode);
        if (i >= 0) {
            lat[i] = now_us() - start;
            starts[i] = start;
        }
    }
    if (open_ctx)
        smtpgate_free(open_ctx);
    if (strcmp(mode, "smtp_open") == 0)
        smtp_close(&open_smtp);
    if (body_fd >= 0) {
        close(body_fd);
        unlink(body_path);
    }
    smtpgate_msg_free(m);

    printf("{\"mode\":\"%s\",\"count\":%d,\"latencies_us\":[", mode, count);
    for (int i = 0; i < count; i++)
        printf("%s%.1f", i ? "," : "", lat[i]);
    printf("],\"starts_us\":[");
    for (int i = 0; i < count; i++)
        printf("%s%.1f", i ? "," : "", starts[i]);
    printf("]}\n");
    free(lat);
    free(starts);
    return 0;
}
