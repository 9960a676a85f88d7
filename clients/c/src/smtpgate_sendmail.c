/*
 * smtpgate-sendmail: a sendmail-compatible command for PHP's mail() and
 * everything else that pipes a message into /usr/sbin/sendmail, one process
 * per message. `smtpgate sendmail` (Python) does the same in ~55 ms of CPU,
 * most of it starting Python; this one is a few milliseconds.
 *
 *     sendmail_path = "/usr/local/bin/smtpgate-sendmail -t -i"
 *
 * It reads the command line and stdin and hands the message over as one raw
 * SEND with the `sendmail` field (docs/protocol.md): the daemon applies -t
 * (To, Cc, Bcc; Bcc removed), -f and -F to the message's header, so this
 * program parses no RFC 5322. It exits once the daemon has the message on
 * disk, with sendmail's exit codes (sysexits.h).
 *
 * The command line is often built from untrusted input (mail()'s fifth
 * parameter, a user's address after -f: CVE-2016-10033), so as sendmail and
 * `smtpgate sendmail` do: options end at the first recipient; a word
 * starting with '-' where a recipient or an option's value is expected is
 * refused; a -F name with a control character is refused; where the
 * message and the token go comes only from $SMTPGATE_SERVER,
 * $SMTPGATE_CONFIG and the configuration file, never the command line.
 * -bs (an SMTP session on stdin/stdout) runs `smtpgate sendmail -bs`; it is
 * taken only first, with at most -i, -oi or -v after it (bs_misplaced).
 */
#include <ctype.h>
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "exits.h"
#include "internal.h"
#include "smtpgate.h"

#define DEFAULT_CONFIG "/etc/smtpgate/smtpgate.toml"
#define DEFAULT_SERVER "tcp://127.0.0.1:2526"
#define DEFAULT_MAX_MESSAGE (25L * 1024 * 1024) /* the daemon's default max_message_size */
#define TIMEOUT_MS 30000
#define MAX_VALUE 4096 /* a config value we use: a path, an address, a token */

static const char USAGE[] =
    "usage: smtpgate-sendmail [-t] [-i] [-f sender] [-F name] [recipient ...] < message\n"
    "       smtpgate-sendmail -bs [-i]   (SMTP on stdin/stdout, through `smtpgate sendmail -bs`)\n"
    "The daemon: $SMTPGATE_SERVER (tcp://HOST:PORT, unix:///PATH), else the configuration\n"
    "file ($SMTPGATE_CONFIG, default " DEFAULT_CONFIG "); the token: $SMTPGATE_TOKEN,\n"
    "else the file's tokens.\n";

/* --help, as the sole argument (as `smtpgate sendmail --help`). */
static const char HELP[] =
    "usage: smtpgate-sendmail [-t] [-i] [-f sender] [-F name] [recipient ...] < message\n"
    "       smtpgate-sendmail -bs [-i]\n"
    "\n"
    "A sendmail-compatible command in front of the smtpgate daemon, for PHP's mail()\n"
    "(sendmail_path = \"smtpgate-sendmail -t -i\"), cron and anything else that pipes a\n"
    "message into /usr/sbin/sendmail. It returns once the daemon has the message on\n"
    "disk. Options end at the first recipient; an argument starting with '-' where a\n"
    "recipient or a value is expected is refused. The daemon is $SMTPGATE_SERVER\n"
    "(tcp://HOST:PORT, unix:///PATH), else the one the configuration file names\n"
    "($SMTPGATE_CONFIG, default " DEFAULT_CONFIG "); the token is $SMTPGATE_TOKEN,\n"
    "else the file's first; never from the command line.\n"
    "\n"
    "  -t                    take the recipients from To, Cc and Bcc (added to those\n"
    "                        given), remove Bcc\n"
    "  -i, -oi               a line of a single '.' does not end the message\n"
    "  -f SENDER, -r SENDER  the envelope sender (and From, if the message has none)\n"
    "  -F NAME               the sender's full name, for a From the message lacks\n"
    "  -bm                   read the message from stdin (the default)\n"
    "  -bs                   speak SMTP on stdin and stdout (Symfony Mailer, Laravel,\n"
    "                        SwiftMailer) through `smtpgate sendmail -bs`; only as the\n"
    "                        first argument, with at most -i, -oi or -v after it\n"
    "  -v                    print the id the daemon gave on stderr\n"
    "  --help                this text (only as the sole argument)\n"
    "\n"
    "exit codes (sysexits.h; the full table: docs/exit-codes.md):\n"
    "  0   the daemon has the message (-bs: always; failures are SMTP replies)\n"
    "  64  the command line, or no recipients\n"
    "  65  the message: over max_message_size, BAD_REQUEST, BAD_HEADER, TOO_LARGE\n"
    "  67  an address was refused: BAD_ADDRESS, DENIED\n"
    "  68  the daemon's host name does not resolve\n"
    "  69  refused for good for another reason\n"
    "  70  the peer does not speak the line protocol (a wrong port?)\n"
    "  71  out of memory, or -bs cannot run `smtpgate sendmail -bs` (not on $PATH)\n"
    "  74  -bs: stdin or stdout failed\n"
    "  75  nothing stored: the daemon is unreachable, BUSY or INTERNAL; keep the\n"
    "      message and try again\n"
    "  77  AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong\n"
    "  78  the file named by $SMTPGATE_CONFIG cannot be read\n";

struct options {
    int extract;         /* -t */
    int dot_ends_input;  /* cleared by -i, -oi */
    int verbose;         /* -v: the id on stderr */
    int smtp_session;    /* -bs */
    const char *sender;  /* -f, -r */
    const char *full_name; /* -F */
    char **recipients;
    int n_recipients;
};

static int fail(int code, const char *fmt, const char *arg)
{
    fputs("smtpgate-sendmail: ", stderr);
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return code;
}

/* A command line we cannot act on: the reason, then the usage. */
static int usage_error(const char *fmt, const char *arg)
{
    fail(EX_USAGE, fmt, arg);
    fputs(USAGE, stderr);
    return EX_USAGE;
}

/* True for a -F name that could break the From field: C0 controls, DEL,
 * C1 (U+0080..U+009F, UTF-8 C2 80..C2 9F), U+2028 and U+2029 (E2 80 A8/A9). */
static int has_control(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    for (; *p; p++) {
        if (*p < 0x20 || *p == 0x7f || (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) ||
            (p[0] == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9)))
            return 1;
    }
    return 0;
}

/* sendmail(8) flags that take a value, attached (-fbob) or as the next word
 * (-f bob). Of these only -f/-r and -F are used; the rest tune a local MTA. */
#define WITH_VALUE "BCFLNORVXfhpr"
/* Flags without a value that change nothing for a hand-off to smtpgate. */
#define IGNORED "AGUimnvx"

/* True when -bs is anywhere but first, or first with anything after it but
 * -i, -oi, -v. PHP appends mail()'s fifth parameter to sendmail_path split
 * at spaces: "x@example.com -bs" there would make the message on stdin, a
 * contact form's text, SMTP commands naming their own recipients. A mailer
 * that speaks SMTP names -bs first (Symfony "-bs", Laravel "-bs -i"). The
 * rule of `smtpgate sendmail`. */
static int bs_misplaced(int argc, char **argv)
{
    for (int k = 1; k < argc; k++) {
        if (strcmp(argv[k], "-bs") == 0 && k > 1)
            return 1;
        if (k > 1 && strcmp(argv[1], "-bs") == 0 && strcmp(argv[k], "-i") != 0 &&
            strcmp(argv[k], "-oi") != 0 && strcmp(argv[k], "-v") != 0)
            return 1;
    }
    return 0;
}

/* Fills o from argv; 0, or an exit code with the reason on stderr. */
static int parse_args(int argc, char **argv, struct options *o)
{
    int i = 1;
    if (bs_misplaced(argc, argv))
        return usage_error("-bs (SMTP on stdin) is taken only as the first argument, with at "
                           "most -i, -oi or -v after it%s", "");
    for (; i < argc; i++) {
        char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        }
        if (arg[0] != '-')
            break; /* the first recipient: no option after it */
        if (arg[1] == '-') {
            if (strncmp(arg, "--server", 8) == 0 || strncmp(arg, "--config", 8) == 0)
                return usage_error(
                            "%s is not taken from the command line (a mail() parameter could send "
                            "the message and the token elsewhere); set $SMTPGATE_SERVER or "
                            "$SMTPGATE_CONFIG, or the configuration file", arg);
            return usage_error("unknown option %s", arg);
        }
        if (arg[1] == '\0')
            return usage_error("'%s' where an option or a recipient is expected", arg);
        char flag = arg[1];
        const char *rest = arg + 2;
        if (flag == 'o') { /* -oi is -i; -odi, -oem, -oQ/var/spool tune a local MTA */
            if (strcmp(rest, "i") == 0)
                o->dot_ends_input = 0;
            continue;
        }
        if (flag == 'q')
            continue; /* -q, -q30m: run the local queue; the daemon runs its own */
        if (flag == 'b') {
            if (strcmp(rest, "s") == 0)
                o->smtp_session = 1;
            else if (strcmp(rest, "m") != 0 && *rest)
                return usage_error("-b%s is not supported (only -bm and -bs; use "
                                       "`smtpgate queue` for the queue)", rest);
            continue;
        }
        if (strchr(WITH_VALUE, flag)) {
            if (*rest == '\0') {
                if (i + 1 >= argc)
                    return usage_error("%s needs a value", arg);
                rest = argv[++i];
            }
            if (rest[0] == '-')
                return usage_error("an option needs a value, not the option-like '%s'", rest);
            if (flag == 'f' || flag == 'r')
                o->sender = rest;
            else if (flag == 'F') {
                if (has_control(rest))
                    return usage_error("-F: the name contains a control character or line "
                                           "break%s", "");
                o->full_name = rest;
            }
            continue;
        }
        for (const char *letter = arg + 1; *letter; letter++) {
            if (*letter == 't')
                o->extract = 1;
            else if (*letter == 'i')
                o->dot_ends_input = 0;
            else if (*letter == 'v')
                o->verbose = 1;
            else if (!strchr(IGNORED, *letter)) {
                char bad[3] = {'-', *letter, '\0'};
                return usage_error("unknown option %s", bad);
            }
        }
    }
    o->recipients = argv + i;
    o->n_recipients = argc - i;
    for (int k = 0; k < o->n_recipients; k++)
        if (o->recipients[k][0] == '-')
            return usage_error("'%s' where a recipient is expected (options come first)",
                        o->recipients[k]);
    return 0;
}

/* ---- the configuration file: the few top-level keys we need ------------- */

struct config {
    char socket[MAX_VALUE];    /* "" when absent */
    char listen[MAX_VALUE];    /* the first listen address */
    char token[MAX_VALUE];     /* the first of `tokens` */
    char tokens_file[MAX_VALUE];
    long max_message_size;     /* 0 when absent */
};

/* A TOML string at *p ("basic" with escapes, or 'literal') into out; *p moves
 * past it. -1 when it is not one or does not fit. Escapes other than \" and
 * \\ are kept as written: no path or token we read has them. */
static int toml_string(const char **p, char *out, size_t outlen)
{
    char quote = **p;
    size_t n = 0;
    if (quote != '"' && quote != '\'')
        return -1;
    for (const char *s = *p + 1; *s && *s != '\n'; s++) {
        if (*s == quote) {
            out[n] = '\0';
            *p = s + 1;
            return 0;
        }
        if (quote == '"' && *s == '\\' && (s[1] == '"' || s[1] == '\\'))
            s++;
        if (n + 1 >= outlen)
            return -1;
        out[n++] = *s;
    }
    return -1;
}

/* The value of a key we read: a string, the first string of an array, or an
 * integer (underscores allowed). Other keys' values are not looked at. */
static int toml_value(const char *v, char *out, size_t outlen, long *number)
{
    if (*v == '[') {
        v++;
        while (*v == ' ' || *v == '\t')
            v++;
        if (*v == ']') {
            *out = '\0';
            return 0;
        }
    }
    if (*v == '"' || *v == '\'')
        return toml_string(&v, out, outlen);
    if (number != NULL && isdigit((unsigned char)*v)) {
        long n = 0;
        for (; isdigit((unsigned char)*v) || *v == '_'; v++)
            if (*v != '_') {
                if (n > (0x7fffffffL - 9) / 10)
                    return -1;
                n = n * 10 + (*v - '0');
            }
        *number = n;
        return 0;
    }
    return -1;
}

/* depth plus the brackets opened less those closed in line s, outside
 * strings and before a comment. */
static int bracket_depth(const char *s, int depth)
{
    for (char q = 0; *s; s++) {
        if (q) {
            if (*s == q)
                q = 0;
        } else if (*s == '"' || *s == '\'')
            q = *s;
        else if (*s == '#')
            break;
        else
            depth += (*s == '[') - (*s == ']');
    }
    return depth;
}

/* Reads the top-level keys socket, listen, tokens, tokens_file and
 * max_message_size of a TOML file, up to its first [table]. -1 when the file
 * cannot be read or a key we need is malformed (why in why). Values that
 * span lines (arrays, multi-line strings) are skipped by counting brackets
 * and triple quotes, so their lines are not read as keys. */
static int read_config(const char *path, struct config *cfg, char *why, size_t whylen)
{
    FILE *fh = fopen(path, "r");
    if (fh == NULL) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t linecap = 0;
    int depth = 0, in_multiline = 0, rc = 0;
    char *pending = NULL; /* a key's array whose first string is on a later line */
    while (rc == 0 && getline(&line, &linecap, fh) != -1) {
        const char *s = line;
        if (in_multiline) {
            if (strstr(s, "\"\"\"") || strstr(s, "'''"))
                in_multiline = 0;
            continue;
        }
        if (depth > 0) { /* inside an array */
            while (isspace((unsigned char)*s))
                s++;
            if (pending != NULL && (*s == '"' || *s == '\'') &&
                toml_string(&s, pending, MAX_VALUE) != 0) {
                snprintf(why, whylen, "%s: cannot read a string in an array", path);
                rc = -1;
            }
            if (*s != '#' && *s != '\0')
                pending = NULL; /* the first element was this line's, if any */
            depth = bracket_depth(s, depth);
            continue;
        }
        while (isspace((unsigned char)*s))
            s++;
        if (*s == '[')
            break; /* the first table: the keys we read are all top-level */
        if (*s == '#' || *s == '\0')
            continue;
        const char *eq = strchr(s, '=');
        if (eq == NULL)
            continue;
        size_t klen = (size_t)(eq - s);
        while (klen && isspace((unsigned char)s[klen - 1]))
            klen--;
        const char *v = eq + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        if (strncmp(v, "\"\"\"", 3) == 0 || strncmp(v, "'''", 3) == 0) {
            in_multiline = strstr(v + 3, v[0] == '"' ? "\"\"\"" : "'''") == NULL;
            continue;
        }
        char *out = NULL;
#define KEY(name) (klen == sizeof name - 1 && strncmp(s, name, klen) == 0)
        if (KEY("socket"))
            out = cfg->socket;
        else if (KEY("listen"))
            out = cfg->listen;
        else if (KEY("tokens"))
            out = cfg->token;
        else if (KEY("tokens_file"))
            out = cfg->tokens_file;
        else if (KEY("max_message_size")) {
            char unused[32];
            if (toml_value(v, unused, sizeof unused, &cfg->max_message_size) != 0)
                cfg->max_message_size = 0; /* not an integer: the default, as the Python command */
        }
#undef KEY
        const char *first = v + (*v == '[');
        while (*first == ' ' || *first == '\t')
            first++;
        if (out != NULL && *v == '[' && (*first == '\n' || *first == '#' || *first == '\0'))
            pending = out;
        else if (out != NULL && toml_value(v, out, MAX_VALUE, NULL) != 0) {
            snprintf(why, whylen, "%s: cannot read the value of %.*s", path, (int)klen, s);
            rc = -1;
        }
        if (*v == '[') /* an array may go on over the next lines */
            depth = bracket_depth(v, 0);
    }
    free(line);
    fclose(fh);
    return rc;
}

/* The first non-blank line of the tokens file into out; "" when it cannot
 * be read (not ours to read: the daemon will say AUTH_REQUIRED). */
static void first_token_of_file(const char *path, char *out, size_t outlen)
{
    *out = '\0';
    FILE *fh = fopen(path, "r");
    if (fh == NULL)
        return;
    char line[MAX_VALUE];
    while (fgets(line, sizeof line, fh) != NULL) {
        char *s = line, *end;
        while (isspace((unsigned char)*s))
            s++;
        end = s + strlen(s);
        while (end > s && isspace((unsigned char)end[-1]))
            *--end = '\0';
        if (*s) {
            snprintf(out, outlen, "%s", s);
            break;
        }
    }
    fclose(fh);
}

/* The daemon's URI: $SMTPGATE_SERVER, the file's socket, else its first
 * listen address (a wildcard address reached on loopback), else the default. */
static void find_server(const struct config *cfg, char *uri, size_t urilen)
{
    const char *env = getenv("SMTPGATE_SERVER");
    if (env != NULL && *env) {
        snprintf(uri, urilen, "%s", env);
    } else if (cfg->socket[0]) {
        snprintf(uri, urilen, "unix://%s", cfg->socket);
    } else if (cfg->listen[0]) {
        const char *colon = strrchr(cfg->listen, ':');
        size_t hlen = colon ? (size_t)(colon - cfg->listen) : 0;
        const char *host = cfg->listen;
        if (hlen == 0 || (hlen == 7 && strncmp(host, "0.0.0.0", 7) == 0))
            host = "127.0.0.1", hlen = 9;
        else if (hlen == 4 && strncmp(host, "[::]", 4) == 0)
            host = "[::1]", hlen = 5;
        snprintf(uri, urilen, "tcp://%.*s:%s", (int)hlen, host, colon ? colon + 1 : "");
    } else {
        snprintf(uri, urilen, "%s", DEFAULT_SERVER);
    }
}

/* ---- the message ---------------------------------------------------------- */

/* stdin into *out (malloc'd); without -i a line of a single "." ends it.
 * 1 when the message is over `limit` bytes (stdin is not read past it),
 * -1 on a read error or out of memory. */
static int read_message(int dot_ends_input, long limit, char **out, size_t *outlen)
{
    size_t cap = 65536, len = 0, line_start = 0;
    char *buf = malloc(cap);
    if (buf == NULL)
        return -1;
    for (;;) {
        if (len == cap) {
            char *p = realloc(buf, cap * 2);
            if (p == NULL) {
                free(buf);
                return -1;
            }
            buf = p;
            cap *= 2;
        }
        size_t want = cap - len;
        if (want > (size_t)limit + 1 - len)
            want = (size_t)limit + 1 - len;
        ssize_t n = read(0, buf + len, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(buf);
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (dot_ends_input) { /* a lone "." line (LF or CRLF) ends the message */
            for (size_t k = len - (size_t)n; k < len; k++) {
                if (buf[k] != '\n')
                    continue;
                size_t l = k - line_start;
                if ((l == 1 && buf[line_start] == '.') ||
                    (l == 2 && buf[line_start] == '.' && buf[line_start + 1] == '\r')) {
                    *out = buf;
                    *outlen = line_start;
                    return 0;
                }
                line_start = k + 1;
            }
        }
        if (len > (size_t)limit) {
            free(buf);
            return 1;
        }
    }
    if (dot_ends_input && len - line_start == 1 && buf[line_start] == '.')
        len = line_start; /* "." as the last line, without its newline */
    *out = buf;
    *outlen = len;
    return 0;
}

/* user@host, what sendmail uses when neither -f nor From names a sender:
 * the login name as Python's getpass.getuser() finds it. */
static void local_sender(char *out, size_t outlen)
{
    static const char *const vars[] = {"LOGNAME", "USER", "LNAME", "USERNAME"};
    const char *user = NULL;
    for (size_t k = 0; k < sizeof vars / sizeof vars[0] && user == NULL; k++) {
        const char *v = getenv(vars[k]);
        if (v != NULL && *v)
            user = v;
    }
    char host[256];
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    if (user == NULL) {
        struct passwd pwd, *pw = NULL;
        char pwbuf[4096];
        if (getpwuid_r(geteuid(), &pwd, pwbuf, sizeof pwbuf, &pw) != 0)
            pw = NULL;
        user = pw != NULL ? pw->pw_name : "nobody"; /* a uid with no name: containers */
        snprintf(out, outlen, "%s@%s", user, host);  /* while pwbuf holds the name */
        return;
    }
    snprintf(out, outlen, "%s@%s", user, host);
}

static void json_key_string(sg_buf *b, const char *key, const char *value, int *bad)
{
    sg_buf_puts(b, key);
    if (value == NULL)
        sg_buf_puts(b, "null");
    else if (sg_json_string(b, value, strlen(value)) != SMTPGATE_OK && !b->oom)
        *bad = 1;
}

/* The SEND object: the message in `raw` (UTF-8) or `raw_base64` (legacy
 * 8-bit charsets: octet for octet) and the command line in `sendmail`.
 * SMTPGATE_ERR with *bad set when an argument is not UTF-8. */
static int build_send(sg_buf *b, const struct options *o, const char *msg, size_t len,
                      const char *default_sender, int *bad)
{
    if (sg_utf8_invalid_at(msg, len) == (size_t)-1) {
        sg_buf_puts(b, "{\"raw\":");
        sg_json_string(b, msg, len);
    } else {
        sg_buf_puts(b, "{\"raw_base64\":\"");
        if (sg_buf_reserve(b, sg_base64_len(len)) == SMTPGATE_OK) {
            sg_base64_encode(b->data + b->len, (const unsigned char *)msg, len);
            b->len += sg_base64_len(len);
        }
        sg_buf_putc(b, '"');
    }
    sg_buf_puts(b, ",\"sendmail\":{\"extract_recipients\":");
    sg_buf_puts(b, o->extract ? "true" : "false");
    sg_buf_puts(b, ",\"recipients\":[");
    for (int k = 0; k < o->n_recipients; k++) {
        if (k)
            sg_buf_putc(b, ',');
        json_key_string(b, "", o->recipients[k], bad);
    }
    json_key_string(b, "],\"sender\":", o->sender, bad);
    json_key_string(b, ",\"full_name\":", o->full_name, bad);
    json_key_string(b, ",\"default_sender\":", default_sender, bad);
    sg_buf_puts(b, "}}");
    sg_buf_putc(b, '\0');
    return b->oom || *bad ? SMTPGATE_ERR : SMTPGATE_OK;
}

/* -bs: the SMTP session is the Python command's (the SMTP door's own
 * handler); a session is long anyway, so its start-up cost does not matter. */
static int run_smtp_session(int argc, char **argv)
{
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (args == NULL)
        return fail(EX_OSERR, "%s", "out of memory");
    args[0] = "smtpgate";
    args[1] = "sendmail";
    for (int k = 1; k < argc; k++)
        args[k + 1] = argv[k];
    execvp(args[0], args);
    int err = errno;
    free(args);
    return fail(EX_OSERR, "-bs runs `smtpgate sendmail -bs`: %s", strerror(err));
}

int main(int argc, char **argv)
{
    struct options o = {0, 1, 0, 0, NULL, NULL, NULL, 0};
    if (argc == 2 && strcmp(argv[1], "--help") == 0) {
        /* Only alone: among other words (a mail() parameter) it stays an unknown option. */
        fputs(HELP, stdout);
        return EX_OK;
    }
    int code = parse_args(argc, argv, &o);
    if (code != 0)
        return code;
    if (o.smtp_session)
        return run_smtp_session(argc, argv);
    if (o.n_recipients == 0 && !o.extract)
        return fail(EX_USAGE, "%s", "no recipients: give them as arguments, or use -t with To/Cc/Bcc");

    static struct config cfg; /* static: 16 KiB, zeroed */
    char why[MAX_VALUE + 128];
    const char *config_path = getenv("SMTPGATE_CONFIG");
    if (read_config(config_path && *config_path ? config_path : DEFAULT_CONFIG, &cfg, why,
                    sizeof why) != 0) {
        if (config_path && *config_path)
            return fail(EX_CONFIG, "cannot read the configuration %s", why);
        memset(&cfg, 0, sizeof cfg); /* the default file is only a hint */
    }
    char uri[MAX_VALUE + 16];
    find_server(&cfg, uri, sizeof uri);
    const char *token = getenv("SMTPGATE_TOKEN");
    if (token == NULL || *token == '\0') {
        if (!cfg.token[0] && cfg.tokens_file[0])
            first_token_of_file(cfg.tokens_file, cfg.token, sizeof cfg.token);
        token = cfg.token[0] ? cfg.token : NULL;
    }
    long limit = cfg.max_message_size > 0 ? cfg.max_message_size : DEFAULT_MAX_MESSAGE;

    char *msg;
    size_t len;
    int rc = read_message(o.dot_ends_input, limit, &msg, &len);
    if (rc == 1) {
        char n[32];
        snprintf(n, sizeof n, "%ld", limit);
        return fail(EX_DATAERR, "the message is over max_message_size (%s bytes)", n);
    }
    if (rc != 0)
        return fail(EX_OSERR, "cannot read the message from stdin: %s", strerror(errno));
    char default_sender[600];
    local_sender(default_sender, sizeof default_sender);
    sg_buf send = {NULL, 0, 0, 0};
    int bad = 0;
    rc = build_send(&send, &o, msg, len, default_sender, &bad);
    free(msg);
    if (rc != SMTPGATE_OK) {
        sg_buf_free(&send);
        return bad ? fail(EX_USAGE, "%s", "an argument is not UTF-8")
                   : fail(EX_OSERR, "%s", "out of memory");
    }

    smtpgate_ctx *c = smtpgate_connect(uri, TIMEOUT_MS);
    if (c == NULL) {
        sg_buf_free(&send);
        return fail(EX_OSERR, "%s", "out of memory");
    }
    char id[SMTPGATE_ID_SIZE];
    if (!c->err && token != NULL)
        smtpgate_auth(c, token);
    if (!c->err)
        smtpgate_send_json(c, send.data, id, sizeof id);
    sg_buf_free(&send);
    if (c->err == 0) {
        code = EX_OK;
        if (o.verbose)
            fprintf(stderr, "smtpgate-sendmail: queued as %s\n", id);
    } else if (c->err == SMTPGATE_ERR_SERVER) {
        /* "CODE text", as the daemon said it (errstr is "CODE: text"). */
        size_t n = strlen(c->code);
        const char *text = strncmp(c->errstr, c->code, n) == 0 && c->errstr[n] == ':'
                               ? c->errstr + n + 1 + (c->errstr[n + 1] == ' ')
                               : c->errstr;
        fprintf(stderr, "smtpgate-sendmail: %s %s\n", c->code, text);
        code = exit_for_error(c->code);
    } else if (c->err == SMTPGATE_ERR_INVALID) {
        code = fail(EX_USAGE, "%s", c->errstr); /* a $SMTPGATE_SERVER that is no URI */
    } else if (c->err == SMTPGATE_ERR_PROTOCOL) {
        code = fail(EX_SOFTWARE, "%s", c->errstr);
    } else if (c->err == SMTPGATE_ERR_OOM) {
        code = fail(EX_OSERR, "%s", c->errstr);
    } else if (strncmp(c->errstr, "resolve ", 8) == 0) {
        /* net.c words a failed getaddrinfo "resolve URI: reason". */
        code = fail(EX_NOHOST, "cannot resolve the daemon's host in %s", c->errstr + 8);
    } else {
        /* Refused, no socket file, timed out, closed mid-reply: nothing is
         * known to be stored, so the caller should keep the mail and retry. */
        fprintf(stderr, "smtpgate-sendmail: cannot reach the daemon at %s: %s\n", uri, c->errstr);
        code = EX_TEMPFAIL;
    }
    smtpgate_free(c);
    return code;
}
