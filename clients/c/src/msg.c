/*
 * msg.c: the message builder. Each setter checks its input and stores it
 * already written as JSON, so building the SEND line is one concatenation.
 * The first error is kept (later calls do nothing) and reported by send.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct smtpgate_msg {
    char error[SMTPGATE_ERRSTR_SIZE]; /* the first error, "" while none */
    /* Each a JSON string literal with its quotes; len 0 while unset. */
    sg_buf from, subject, text, html, idempotency_key;
    /* Comma-separated JSON string literals. */
    sg_buf to, cc, bcc, reply_to;
    sg_buf headers;     /* comma-separated "name":"value" members */
    sg_buf attachments; /* comma-separated attachment objects */
};

smtpgate_msg *smtpgate_msg_new(void) { return calloc(1, sizeof(smtpgate_msg)); }

void smtpgate_msg_free(smtpgate_msg *m)
{
    if (m == NULL)
        return;
    sg_buf *all[] = {&m->from, &m->subject, &m->text, &m->html, &m->idempotency_key, &m->to,
                     &m->cc,   &m->bcc,     &m->reply_to, &m->headers, &m->attachments};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        sg_buf_free(all[i]);
    free(m);
}

int sg_msg_has_idempotency_key(const smtpgate_msg *m) { return m->idempotency_key.len > 0; }

const char *smtpgate_msg_error(const smtpgate_msg *m) { return m->error[0] ? m->error : NULL; }

static int msg_fail(smtpgate_msg *m, const char *fmt, ...)
{
    if (m->error[0] == '\0') {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->error, sizeof m->error, fmt, ap);
        va_end(ap);
    }
    return SMTPGATE_ERR;
}

/* Checks s (NULL and invalid UTF-8 are refused) and appends it as a JSON string to b. */
static int put_checked(smtpgate_msg *m, sg_buf *b, const char *what, const char *s, size_t len)
{
    if (m->error[0])
        return SMTPGATE_ERR;
    if (s == NULL)
        return msg_fail(m, "%s: NULL", what);
    size_t bad = sg_utf8_invalid_at(s, len);
    if (bad != (size_t)-1)
        return msg_fail(m, "%s: invalid UTF-8 at byte %zu", what, bad);
    if (sg_json_string(b, s, len) != SMTPGATE_OK)
        return msg_fail(m, "%s: out of memory", what);
    return SMTPGATE_OK;
}

static int set_field(smtpgate_msg *m, sg_buf *field, const char *what, const char *s, size_t len)
{
    sg_buf fresh = {0};
    if (put_checked(m, &fresh, what, s, len) != SMTPGATE_OK) {
        sg_buf_free(&fresh);
        return SMTPGATE_ERR;
    }
    sg_buf_free(field);
    *field = fresh;
    return SMTPGATE_OK;
}

static int add_item(smtpgate_msg *m, sg_buf *list, const char *what, const char *s)
{
    if (s == NULL)
        return put_checked(m, list, what, s, 0);
    size_t before = list->len;
    if (list->len)
        sg_buf_putc(list, ',');
    if (put_checked(m, list, what, s, strlen(s)) != SMTPGATE_OK) {
        list->len = before;
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

#define STRLEN0(s) ((s) ? strlen(s) : 0)

int smtpgate_msg_set_from(smtpgate_msg *m, const char *a)
{
    return set_field(m, &m->from, "from", a, STRLEN0(a));
}
int smtpgate_msg_add_to(smtpgate_msg *m, const char *a) { return add_item(m, &m->to, "to", a); }
int smtpgate_msg_add_cc(smtpgate_msg *m, const char *a) { return add_item(m, &m->cc, "cc", a); }
int smtpgate_msg_add_bcc(smtpgate_msg *m, const char *a) { return add_item(m, &m->bcc, "bcc", a); }
int smtpgate_msg_add_reply_to(smtpgate_msg *m, const char *a)
{
    return add_item(m, &m->reply_to, "reply_to", a);
}
int smtpgate_msg_set_subject(smtpgate_msg *m, const char *s)
{
    return set_field(m, &m->subject, "subject", s, STRLEN0(s));
}
int smtpgate_msg_set_text(smtpgate_msg *m, const char *s)
{
    return set_field(m, &m->text, "text", s, STRLEN0(s));
}
int smtpgate_msg_set_html(smtpgate_msg *m, const char *s)
{
    return set_field(m, &m->html, "html", s, STRLEN0(s));
}
int smtpgate_msg_set_text_n(smtpgate_msg *m, const char *s, size_t len)
{
    return set_field(m, &m->text, "text", s, len);
}
int smtpgate_msg_set_html_n(smtpgate_msg *m, const char *s, size_t len)
{
    return set_field(m, &m->html, "html", s, len);
}
int smtpgate_msg_set_idempotency_key(smtpgate_msg *m, const char *k)
{
    return set_field(m, &m->idempotency_key, "idempotency_key", k, STRLEN0(k));
}

int smtpgate_msg_add_header(smtpgate_msg *m, const char *name, const char *value)
{
    size_t before = m->headers.len;
    if (m->headers.len)
        sg_buf_putc(&m->headers, ',');
    if (put_checked(m, &m->headers, "header name", name, STRLEN0(name)) != SMTPGATE_OK ||
        sg_buf_putc(&m->headers, ':') != SMTPGATE_OK ||
        put_checked(m, &m->headers, "header value", value, STRLEN0(value)) != SMTPGATE_OK) {
        m->headers.len = before;
        return msg_fail(m, "header: out of memory");
    }
    return SMTPGATE_OK;
}

int smtpgate_msg_attach(smtpgate_msg *m, const char *filename, const char *content_type,
                        const char *content_id, const void *data, size_t len)
{
    if (m->error[0])
        return SMTPGATE_ERR;
    if (data == NULL && len > 0)
        return msg_fail(m, "attachment: NULL data");
    if (content_type == NULL && filename != NULL)
        content_type = sg_guess_content_type(filename);
    sg_buf *b = &m->attachments;
    size_t before = b->len;
    if (b->len)
        sg_buf_putc(b, ',');
    sg_buf_puts(b, "{\"filename\":");
    if (put_checked(m, b, "attachment filename", filename, STRLEN0(filename)) != SMTPGATE_OK)
        goto fail;
    sg_buf_puts(b, ",\"content_type\":");
    if (put_checked(m, b, "attachment content_type", content_type, STRLEN0(content_type)) !=
        SMTPGATE_OK)
        goto fail;
    if (content_id != NULL) {
        sg_buf_puts(b, ",\"content_id\":");
        if (put_checked(m, b, "attachment content_id", content_id, strlen(content_id)) !=
            SMTPGATE_OK)
            goto fail;
    }
    sg_buf_puts(b, ",\"content_base64\":\"");
    size_t b64 = sg_base64_len(len);
    if (b64 < len || sg_buf_reserve(b, b64 + 3) != SMTPGATE_OK) {
        msg_fail(m, "attachment %s: out of memory", filename);
        goto fail;
    }
    sg_base64_encode(b->data + b->len, data, len);
    b->len += b64;
    sg_buf_puts(b, "\"}");
    if (b->oom) {
        msg_fail(m, "attachment %s: out of memory", filename);
        goto fail;
    }
    return SMTPGATE_OK;
fail:
    b->len = before;
    b->oom = 0;
    return SMTPGATE_ERR;
}

int smtpgate_msg_attach_file(smtpgate_msg *m, const char *path, const char *filename,
                             const char *content_type)
{
    if (m->error[0])
        return SMTPGATE_ERR;
    if (path == NULL)
        return msg_fail(m, "attachment: NULL path");
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return msg_fail(m, "attachment %s: %s", path, strerror(errno));
    sg_buf data = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (sg_buf_append(&data, chunk, n) != SMTPGATE_OK)
            break;
    int read_error = ferror(f);
    int saved = errno;
    fclose(f);
    int rc;
    if (read_error)
        rc = msg_fail(m, "attachment %s: %s", path, strerror(saved));
    else if (data.oom)
        rc = msg_fail(m, "attachment %s: out of memory", path);
    else {
        if (filename == NULL) {
            const char *slash = strrchr(path, '/');
            filename = slash ? slash + 1 : path;
        }
        rc = smtpgate_msg_attach(m, filename, content_type, NULL, data.data, data.len);
    }
    sg_buf_free(&data);
    return rc;
}

static void put_member(sg_buf *b, int *first, const char *name, const sg_buf *v, char open,
                       char close)
{
    if (v->len == 0)
        return;
    sg_buf_puts(b, *first ? "\"" : ",\"");
    *first = 0;
    sg_buf_puts(b, name);
    sg_buf_puts(b, "\":");
    if (open)
        sg_buf_putc(b, open);
    sg_buf_append(b, v->data, v->len);
    if (close)
        sg_buf_putc(b, close);
}

int sg_msg_write_json(const smtpgate_msg *m, sg_buf *b, char *why)
{
    if (m->error[0]) {
        snprintf(why, SMTPGATE_ERRSTR_SIZE, "%s", m->error);
        return SMTPGATE_ERR;
    }
    if (m->from.len == 0) {
        snprintf(why, SMTPGATE_ERRSTR_SIZE, "from is required");
        return SMTPGATE_ERR;
    }
    if (m->to.len + m->cc.len + m->bcc.len == 0) {
        snprintf(why, SMTPGATE_ERRSTR_SIZE, "no recipient: add to, cc or bcc");
        return SMTPGATE_ERR;
    }
    const sg_buf *parts[] = {&m->from, &m->to,   &m->cc,      &m->bcc,         &m->reply_to,
                             &m->subject, &m->text, &m->html, &m->headers, &m->attachments,
                             &m->idempotency_key};
    size_t total = 2;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        total += parts[i]->len + 24; /* the member name, quotes, brackets, comma */
    sg_buf_reserve(b, total);
    int first = 1;
    sg_buf_putc(b, '{');
    put_member(b, &first, "from", &m->from, 0, 0);
    put_member(b, &first, "to", &m->to, '[', ']');
    put_member(b, &first, "cc", &m->cc, '[', ']');
    put_member(b, &first, "bcc", &m->bcc, '[', ']');
    put_member(b, &first, "reply_to", &m->reply_to, '[', ']');
    put_member(b, &first, "subject", &m->subject, 0, 0);
    put_member(b, &first, "text", &m->text, 0, 0);
    put_member(b, &first, "html", &m->html, 0, 0);
    put_member(b, &first, "headers", &m->headers, '{', '}');
    put_member(b, &first, "attachments", &m->attachments, '[', ']');
    put_member(b, &first, "idempotency_key", &m->idempotency_key, 0, 0);
    sg_buf_putc(b, '}');
    if (b->oom) {
        snprintf(why, SMTPGATE_ERRSTR_SIZE, "out of memory");
        return SMTPGATE_ERR;
    }
    return SMTPGATE_OK;
}

char *smtpgate_msg_json(const smtpgate_msg *m, size_t *len)
{
    sg_buf b = {0};
    char why[SMTPGATE_ERRSTR_SIZE];
    if (sg_msg_write_json(m, &b, why) != SMTPGATE_OK) {
        sg_buf_free(&b);
        return NULL;
    }
    if (len)
        *len = b.len;
    return b.data;
}
