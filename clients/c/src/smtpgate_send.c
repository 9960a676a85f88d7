/*
 * smtpgate-send: hand one message to smtpgate from a shell script, a cron job
 * or a monitoring alert (Zabbix, Nagios). The body comes from stdin; the id
 * the daemon gave goes to stdout; the exit code says what happened.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "exits.h"
#include "smtpgate.h"

#define DEFAULT_SERVER "tcp://127.0.0.1:2526"
#define MAX_SERVERS 16
/* The daemon refuses WAIT above 3600 s (BAD_REQUEST); longer waits take several WAITs. */
#define MAX_WAIT_PER_REQUEST 3600

static void usage(FILE *out)
{
    fputs(
        "usage: smtpgate-send [--server URI]... -f FROM -t TO [-t TO]... [-c CC]... [-b BCC]...\n"
        "                     -s SUBJECT [-r REPLY_TO] [-a FILE]... [-H 'Name: value']...\n"
        "                     [--html] [--wait SECONDS] [--timeout SECONDS] [-k KEY]\n"
        "                     [--token-file FILE] < body\n"
        "\n"
        "Hands one message to the smtpgate daemon and prints its id.\n"
        "\n"
        "  --server URI     tcp://HOST:PORT or unix:///PATH; repeat it to fail over to\n"
        "                   the next daemon when one is down, BUSY or INTERNAL; never\n"
        "                   once the SEND went out unanswered (that one may have it)\n"
        "                   (default: $SMTPGATE_SERVER, else " DEFAULT_SERVER ")\n"
        "  -f, --from       sender address\n"
        "  -t, --to         recipient (repeatable); -c/--cc, -b/--bcc likewise\n"
        "  -r, --reply-to   Reply-To address (repeatable)\n"
        "  -s, --subject    subject (UTF-8)\n"
        "  -a, --attach     attach a file (repeatable)\n"
        "  -H, --header     extra header field 'Name: value' (repeatable)\n"
        "  -k, --idempotency-key KEY   a repeat with the same key queues nothing new (on\n"
        "                   the same daemon): an unanswered SEND is sent to it once more\n"
        "      --html       the body on stdin is HTML, not plain text\n"
        "      --wait N     wait up to N seconds for the message to be sent or to fail\n"
        "      --timeout N  connect/read/write timeout in seconds (default 10)\n"
        "      --token-file FILE  the client token for AUTH (default $SMTPGATE_TOKEN)\n"
        "  -h, --help       this text;  --version  the version\n"
        "\n"
        "The token for AUTH is read from --token-file FILE, else $SMTPGATE_TOKEN (never from\n"
        "the command line, where other users could read it in the process list).\n"
        "\n"
        "exit codes (sysexits.h; the full table: docs/exit-codes.md):\n"
        "  0   the daemon has the message (with --wait: sent); its id is on stdout\n"
        "  64  the command line: an unknown option, no -f, -t or -s, a bad --server\n"
        "  65  the message: the body is not UTF-8, or BAD_REQUEST, BAD_HEADER,\n"
        "      TOO_LARGE\n"
        "  66  an attachment or the token file cannot be read\n"
        "  67  an address was refused: BAD_ADDRESS, DENIED\n"
        "  68  the daemon's host name does not resolve\n"
        "  69  with --wait: the message failed; or refused for another reason\n"
        "  70  the peer does not speak the line protocol (a wrong port?)\n"
        "  75  nothing stored: every daemon down, BUSY or INTERNAL (try again later);\n"
        "      or the SEND went out and no reply came (timed out, connection lost):\n"
        "      maybe stored, said on stderr; running again may send it twice, unless\n"
        "      with the same -k to the same daemon;\n"
        "      with --wait: stored, but not final when the time ran out\n"
        "  77  AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong\n",
        out);
}

struct options {
    const char *servers[MAX_SERVERS];
    int n_servers;
    const char *token_file;
    int html, wait_seconds, timeout_seconds;
    int keyed; /* -k: a repeat to the same daemon queues nothing new */
};

static int die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "smtpgate-send: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\ntry 'smtpgate-send --help'\n");
    return EX_USAGE;
}

static int parse_seconds(const char *s, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 86400)
        return -1;
    *out = (int)v;
    return 0;
}

/* Adds "Name: value" as an extra header; -1 when there is no colon. */
static int add_header(smtpgate_msg *m, const char *field)
{
    const char *colon = strchr(field, ':');
    if (colon == NULL || colon == field)
        return -1;
    char *name = malloc((size_t)(colon - field) + 1);
    if (name == NULL)
        return -1;
    memcpy(name, field, (size_t)(colon - field));
    name[colon - field] = '\0';
    const char *value = colon + 1;
    while (*value == ' ' || *value == '\t')
        value++;
    smtpgate_msg_add_header(m, name, value);
    free(name);
    return 0;
}

/* Fills opts and m from argv; returns -1 to go on, or an exit code. */
static int parse_args(int argc, char **argv, struct options *opts, smtpgate_msg *m,
                      int *have_from, int *have_rcpt, int *have_subject)
{
    /* key: what the switch below acts on; short_name 0: a long option only. */
    static const struct {
        char key, short_name;
        const char *long_name;
        int takes_arg;
    } table[] = {
        {'f', 'f', "from", 1},     {'t', 't', "to", 1},         {'c', 'c', "cc", 1},
        {'b', 'b', "bcc", 1},      {'r', 'r', "reply-to", 1},   {'s', 's', "subject", 1},
        {'a', 'a', "attach", 1},   {'H', 'H', "header", 1},     {'k', 'k', "idempotency-key", 1},
        {'h', 'h', "help", 0},     {'S', 0, "server", 1},       {'W', 0, "wait", 1},
        {'T', 0, "timeout", 1},    {'m', 0, "html", 0},         {'V', 0, "version", 0},
        {'K', 0, "token-file", 1},
    };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *value = NULL;
        char key = 0;
        if (strcmp(a, "--") == 0) {
            if (i + 1 < argc)
                return die_usage("unexpected argument '%s'", argv[i + 1]);
            break;
        }
        for (size_t k = 0; k < sizeof table / sizeof table[0] && !key; k++) {
            size_t ln = strlen(table[k].long_name);
            if (a[0] == '-' && a[1] == '-' && strncmp(a + 2, table[k].long_name, ln) == 0 &&
                (a[2 + ln] == '\0' || (a[2 + ln] == '=' && table[k].takes_arg))) {
                key = table[k].key; /* --name, --name=value */
                if (a[2 + ln] == '=')
                    value = a + 3 + ln;
            } else if (a[0] == '-' && table[k].short_name && a[1] == table[k].short_name) {
                key = table[k].key; /* -x, -xVALUE */
                if (a[2] != '\0') {
                    if (!table[k].takes_arg)
                        return die_usage("unknown option '%s'", a);
                    value = a + 2;
                }
            }
            if (key && table[k].takes_arg && value == NULL) {
                if (i + 1 >= argc)
                    return die_usage("option '%s' needs a value", a);
                value = argv[++i];
            }
        }
        if (!key)
            return die_usage(a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'", a);
        switch (key) {
        case 'f': smtpgate_msg_set_from(m, value); *have_from = 1; break;
        case 't': smtpgate_msg_add_to(m, value); *have_rcpt = 1; break;
        case 'c': smtpgate_msg_add_cc(m, value); *have_rcpt = 1; break;
        case 'b': smtpgate_msg_add_bcc(m, value); *have_rcpt = 1; break;
        case 'r': smtpgate_msg_add_reply_to(m, value); break;
        case 's': smtpgate_msg_set_subject(m, value); *have_subject = 1; break;
        case 'a':
            /* An earlier error is reported after parsing; this one is the file's. */
            if (smtpgate_msg_error(m) == NULL &&
                smtpgate_msg_attach_file(m, value, NULL, NULL) != SMTPGATE_OK) {
                fprintf(stderr, "smtpgate-send: cannot read the %s\n", smtpgate_msg_error(m));
                return EX_NOINPUT;
            }
            break;
        case 'K': opts->token_file = value; break;
        case 'k': smtpgate_msg_set_idempotency_key(m, value); opts->keyed = 1; break;
        case 'H':
            if (add_header(m, value) != 0)
                return die_usage("header '%s' is not 'Name: value'", value);
            break;
        case 'S':
            if (opts->n_servers == MAX_SERVERS)
                return die_usage("more than 16 servers at '%s'", value);
            opts->servers[opts->n_servers++] = value;
            break;
        case 'W':
            if (parse_seconds(value, &opts->wait_seconds) != 0)
                return die_usage("--wait needs seconds (0..86400), got '%s'", value);
            break;
        case 'T':
            if (parse_seconds(value, &opts->timeout_seconds) != 0 || opts->timeout_seconds == 0)
                return die_usage("--timeout needs seconds (1..86400), got '%s'", value);
            break;
        case 'm': opts->html = 1; break;
        case 'h': usage(stdout); return EX_OK;
        case 'V': printf("smtpgate-send %s (protocol %d)\n", SMTPGATE_VERSION, SMTPGATE_PROTOCOL_VERSION); return EX_OK;
        }
    }
    return -1;
}

/* Reads all of stdin into the message body. */
static int read_body(smtpgate_msg *m, int html)
{
    size_t cap = 65536, len = 0;
    char *body = malloc(cap);
    if (body == NULL)
        return -1;
    for (;;) {
        if (len == cap) {
            char *p = cap > ((size_t)-1) / 2 ? NULL : realloc(body, cap * 2);
            if (p == NULL) {
                free(body);
                return -1;
            }
            body = p;
            cap *= 2;
        }
        size_t n = fread(body + len, 1, cap - len, stdin);
        len += n;
        if (n == 0)
            break;
    }
    int bad = ferror(stdin);
    if (!bad) {
        if (html)
            smtpgate_msg_set_html_n(m, body, len);
        else
            smtpgate_msg_set_text_n(m, body, len);
    }
    free(body);
    return bad ? -1 : 0;
}

/* The exit code of a failed connect, AUTH or SEND. */
static int exit_for_failure(const smtpgate_ctx *c)
{
    switch (c->err) {
    case SMTPGATE_ERR_SERVER: return exit_for_error(c->code);
    case SMTPGATE_ERR_INVALID: return EX_USAGE; /* a bad --server URI or token */
    case SMTPGATE_ERR_PROTOCOL: return EX_SOFTWARE;
    default:
        /* net.c words a failed getaddrinfo "resolve URI: reason". */
        return strncmp(c->errstr, "resolve ", 8) == 0 ? EX_NOHOST : EX_TEMPFAIL;
    }
}

/* True when the SEND just tried failed after it went out whole, without an
 * ERR reply (a timeout, a lost connection, a reply that is not the
 * protocol): the daemon may have stored the message. */
static int maybe_stored(const smtpgate_ctx *c)
{
    return c->err && c->request_sent && c->err != SMTPGATE_ERR_SERVER &&
           c->err != SMTPGATE_ERR_INVALID;
}

/* Hands m to the first server that takes it. A server that cannot be
 * reached (nothing of the SEND was written) or answers BUSY or INTERNAL
 * (nothing was stored) makes us try the next one. Once the SEND went out and
 * no reply came, that daemon may have stored it: another one would make a
 * duplicate, so none is tried; with -k the same daemon is asked once more (a
 * repeat with the key queues nothing new, and answers the first one's id).
 * Returns the context that took it (id filled) or NULL with *code set to the
 * exit code of the last failure. */
static smtpgate_ctx *hand_off(const struct options *opts, const smtpgate_msg *m,
                              const char *token, char *id, int *code)
{
    int timeout_ms = (opts->timeout_seconds ? opts->timeout_seconds : 10) * 1000;
    *code = EX_TEMPFAIL;
    for (int i = 0; i < opts->n_servers; i++) {
        smtpgate_ctx *c = smtpgate_connect(opts->servers[i], timeout_ms);
        if (c == NULL) {
            fprintf(stderr, "smtpgate-send: out of memory\n");
            return NULL;
        }
        int sending = 0;
        if (!c->err && token != NULL)
            smtpgate_auth(c, token);
        if (!c->err) {
            sending = 1;
            smtpgate_send(c, m, id, SMTPGATE_ID_SIZE);
        }
        int unanswered = sending && maybe_stored(c);
        if (unanswered && opts->keyed && c->err != SMTPGATE_ERR_PROTOCOL) {
            fprintf(stderr, "smtpgate-send: %s; sending it again with its idempotency key\n",
                    c->errstr);
            smtpgate_send(c, m, id, SMTPGATE_ID_SIZE); /* reconnects, repeats AUTH */
            /* A refusal for good (BAD_ADDRESS, ...) stands for the first copy too. */
            if (c->err == SMTPGATE_ERR_SERVER && exit_for_error(c->code) != EX_TEMPFAIL)
                unanswered = 0;
        }
        if (!c->err)
            return c;
        fprintf(stderr, "smtpgate-send: %s\n", c->errstr);
        *code = exit_for_failure(c);
        if (unanswered) {
            fprintf(stderr,
                    "smtpgate-send: outcome unknown: the SEND went out but no usable reply came, "
                    "so %s may have stored the message; not tried on another server. %s\n",
                    opts->servers[i],
                    opts->keyed ? "Sending it again to that daemon with the same -k queues "
                                  "nothing new."
                                : "Sending it again may deliver it twice; with -k KEY a repeat "
                                  "to the same daemon is harmless.");
            if (*code != EX_SOFTWARE) /* the peer does not speak the protocol: 70 */
                *code = EX_TEMPFAIL;
            smtpgate_free(c);
            return NULL;
        }
        /* A refusal for good, or our own input: every server would say the same. */
        int retry_elsewhere = c->err != SMTPGATE_ERR_INVALID &&
                              (c->err != SMTPGATE_ERR_SERVER || *code == EX_TEMPFAIL);
        smtpgate_free(c);
        if (!retry_elsewhere)
            return NULL;
    }
    return NULL;
}

/* The first line of the token file, without its line ending; NULL with a
 * message on stderr when it cannot be read. The caller frees it. */
static char *read_token_file(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[1024];
    if (f == NULL || fgets(line, sizeof line, f) == NULL) {
        fprintf(stderr, "smtpgate-send: cannot read the token file %s: %s\n", path,
                f == NULL || ferror(f) ? strerror(errno) : "empty");
        if (f != NULL)
            fclose(f);
        return NULL;
    }
    fclose(f);
    line[strcspn(line, "\r\n")] = '\0';
    return strdup(line);
}

/* WAIT until the message is final or `seconds` passed; returns the exit code. */
static int wait_final(smtpgate_ctx *c, const char *id, int seconds)
{
    time_t until = time(NULL) + seconds;
    smtpgate_state state = SMTPGATE_STATE_UNKNOWN;
    char *json = NULL;
    for (;;) {
        time_t now = time(NULL);
        int left = now >= until ? 0 : (int)(until - now);
        if (left > MAX_WAIT_PER_REQUEST)
            left = MAX_WAIT_PER_REQUEST;
        free(json);
        json = NULL;
        if (smtpgate_wait(c, id, left, &state, &json) != SMTPGATE_OK) {
            fprintf(stderr, "smtpgate-send: message %s queued, but waiting failed: %s\n", id,
                    c->errstr);
            return EX_TEMPFAIL;
        }
        /* The daemon may cap one WAIT below what we asked: ask again while time is left. */
        if (state == SMTPGATE_STATE_SENT || state == SMTPGATE_STATE_FAILED || left == 0 ||
            time(NULL) >= until)
            break;
    }
    int code = state == SMTPGATE_STATE_SENT     ? EX_OK
               : state == SMTPGATE_STATE_FAILED ? EX_UNAVAILABLE
                                                : EX_TEMPFAIL;
    if (code != EX_OK)
        fprintf(stderr, "smtpgate-send: message %s is %s: %s\n", id, smtpgate_state_name(state),
                json);
    free(json);
    return code;
}

int main(int argc, char **argv)
{
    struct options opts;
    memset(&opts, 0, sizeof opts);
    int have_from = 0, have_rcpt = 0, have_subject = 0;
    smtpgate_msg *m = smtpgate_msg_new();
    if (m == NULL) {
        fprintf(stderr, "smtpgate-send: out of memory\n");
        return EX_TEMPFAIL;
    }
    int code = parse_args(argc, argv, &opts, m, &have_from, &have_rcpt, &have_subject);
    if (code >= 0) {
        smtpgate_msg_free(m);
        return code;
    }
    if (!have_from || !have_rcpt || !have_subject) {
        smtpgate_msg_free(m);
        return die_usage("%s", !have_from   ? "-f FROM is required"
                               : !have_rcpt ? "at least one -t, -c or -b is required"
                                            : "-s SUBJECT is required");
    }
    if (opts.n_servers == 0) {
        const char *env = getenv("SMTPGATE_SERVER");
        opts.servers[opts.n_servers++] = env && *env ? env : DEFAULT_SERVER;
    }
    char *token = NULL;
    if (opts.token_file != NULL) {
        token = read_token_file(opts.token_file);
        if (token == NULL) {
            smtpgate_msg_free(m);
            return EX_NOINPUT;
        }
    } else if (getenv("SMTPGATE_TOKEN") != NULL && *getenv("SMTPGATE_TOKEN") != '\0') {
        token = strdup(getenv("SMTPGATE_TOKEN"));
    }
    if (read_body(m, opts.html) != 0) {
        fprintf(stderr, "smtpgate-send: cannot read the body from stdin\n");
        code = EX_NOINPUT;
    } else if (smtpgate_msg_error(m) != NULL) {
        fprintf(stderr, "smtpgate-send: %s\n", smtpgate_msg_error(m));
        code = EX_DATAERR;
    }
    if (code >= 0) {
        smtpgate_msg_free(m);
        free(token);
        return code;
    }
    char id[SMTPGATE_ID_SIZE];
    smtpgate_ctx *c = hand_off(&opts, m, token, id, &code);
    smtpgate_msg_free(m);
    free(token);
    if (c == NULL)
        return code;
    printf("%s\n", id);
    fflush(stdout);
    code = EX_OK;
    if (opts.wait_seconds > 0)
        code = wait_final(c, id, opts.wait_seconds);
    smtpgate_free(c);
    return code;
}
