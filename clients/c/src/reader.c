/*
 * reader.c: the sans-IO reply reader. Bytes in (smtpgate_reader_feed),
 * replies out (smtpgate_reader_get_reply); no socket anywhere, so any I/O
 * layer (ours, an event loop's) can drive it and tests can feed it by hand.
 *
 * docs/protocol.md, Framing: a reply is one line ending in CRLF,
 * `OK[ PAYLOAD]` or `ERR CODE TEXT`. A bare LF is accepted too (the CR is
 * dropped when present), like the daemon does for requests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

smtpgate_reader *smtpgate_reader_new(size_t max_line)
{
    smtpgate_reader *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->max_line = max_line ? max_line : SMTPGATE_READER_MAX_LINE;
    return r;
}

void smtpgate_reader_free(smtpgate_reader *r)
{
    if (r == NULL)
        return;
    free(r->buf);
    free(r);
}

void smtpgate_reply_free(smtpgate_reply *reply)
{
    if (reply == NULL)
        return;
    free(reply->payload);
    free(reply);
}

/* Makes the error sticky (the stream cannot be resynchronised); returns SMTPGATE_ERR. */
static int reader_fail(smtpgate_reader *r, int err, const char *what)
{
    r->err = err;
    snprintf(r->errstr, sizeof r->errstr, "%s", what);
    return SMTPGATE_ERR;
}

/* A protocol error that quotes the offending line: at most 40 bytes, non-printables as '?'. */
static int reader_fail_quoting(smtpgate_reader *r, const char *what, const char *line, size_t len)
{
    char shown[41];
    size_t i;
    for (i = 0; i < len && i < sizeof shown - 1; i++) {
        unsigned char ch = (unsigned char)line[i];
        shown[i] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    shown[i] = '\0';
    r->err = SMTPGATE_ERR_PROTOCOL;
    snprintf(r->errstr, sizeof r->errstr, "%s: \"%s\"", what, shown);
    return SMTPGATE_ERR;
}

int smtpgate_reader_feed(smtpgate_reader *r, const char *buf, size_t len)
{
    if (r->err)
        return SMTPGATE_ERR;
    if (len == 0)
        return SMTPGATE_OK;
    if (r->pos > 0 && (r->pos == r->len || r->cap - r->len < len)) {
        /* Drop consumed bytes before growing: the buffer holds unread bytes only. */
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->pos = 0;
    }
    if (r->cap - r->len < len) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap - r->len < len) {
            if (cap > ((size_t)-1) / 2)
                return reader_fail(r, SMTPGATE_ERR_OOM, "reply buffer too large");
            cap *= 2;
        }
        char *p = realloc(r->buf, cap);
        if (p == NULL)
            return reader_fail(r, SMTPGATE_ERR_OOM, "out of memory");
        r->buf = p;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, buf, len);
    r->len += len;
    return SMTPGATE_OK;
}

/* A reply from one complete line (CR/LF already stripped), or SMTPGATE_ERR. */
static int parse_line(smtpgate_reader *r, const char *line, size_t n, smtpgate_reply **out)
{
    const char *text;
    size_t text_len;
    smtpgate_reply *reply = calloc(1, sizeof *reply);
    if (reply == NULL)
        return reader_fail(r, SMTPGATE_ERR_OOM, "out of memory");
    if (memchr(line, '\0', n) != NULL) {
        free(reply);
        return reader_fail_quoting(r, "NUL byte in reply", line, n);
    }
    if (n >= 2 && memcmp(line, "OK", 2) == 0 && (n == 2 || line[2] == ' ')) {
        reply->type = SMTPGATE_REPLY_OK;
        text = n == 2 ? line + 2 : line + 3;
        text_len = n == 2 ? 0 : n - 3;
    } else if (n > 4 && memcmp(line, "ERR ", 4) == 0) {
        /* The code runs to the next space or to the end of the line. */
        const char *code = line + 4;
        size_t rest = n - 4, code_len = 0;
        while (code_len < rest && code[code_len] != ' ')
            code_len++;
        if (code_len == 0 || code_len >= SMTPGATE_CODE_SIZE) {
            free(reply);
            return reader_fail_quoting(r, "bad error code in reply", line, n);
        }
        reply->type = SMTPGATE_REPLY_ERR;
        memcpy(reply->code, code, code_len);
        reply->code[code_len] = '\0';
        text = code_len < rest ? code + code_len + 1 : code + code_len;
        text_len = (size_t)(line + n - text);
    } else {
        free(reply);
        return reader_fail_quoting(r, "unexpected reply", line, n);
    }
    reply->payload = malloc(text_len + 1);
    if (reply->payload == NULL) {
        free(reply);
        return reader_fail(r, SMTPGATE_ERR_OOM, "out of memory");
    }
    memcpy(reply->payload, text, text_len);
    reply->payload[text_len] = '\0';
    reply->len = text_len;
    *out = reply;
    return SMTPGATE_OK;
}

int smtpgate_reader_get_reply(smtpgate_reader *r, smtpgate_reply **reply)
{
    *reply = NULL;
    if (r->err)
        return SMTPGATE_ERR;
    if (r->pos == r->len)
        return SMTPGATE_OK; /* nothing buffered (buf may still be NULL) */
    const char *start = r->buf + r->pos;
    size_t avail = r->len - r->pos;
    /* Resume the search where the last call stopped: feeding a long line in
     * small pieces stays linear, not quadratic. */
    const char *lf = avail > r->scanned ? memchr(start + r->scanned, '\n', avail - r->scanned)
                                        : NULL;
    if (lf == NULL) {
        r->scanned = avail;
        /* max_line counts the line without its CRLF; one pending CR is allowed. */
        if (avail > r->max_line + 1) {
            char what[64];
            snprintf(what, sizeof what, "reply line longer than %zu bytes", r->max_line);
            return reader_fail_quoting(r, what, start, avail);
        }
        return SMTPGATE_OK;
    }
    size_t n = (size_t)(lf - start);
    r->pos += n + 1;
    r->scanned = 0;
    if (n > 0 && start[n - 1] == '\r')
        n--;
    if (n > r->max_line) {
        char what[64];
        snprintf(what, sizeof what, "reply line longer than %zu bytes", r->max_line);
        return reader_fail_quoting(r, what, start, n);
    }
    return parse_line(r, start, n, reply);
}
