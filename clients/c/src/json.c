/*
 * json.c: the byte-level helpers: growable buffer, UTF-8 check, JSON string
 * writer, base64 encoder, a reader of one top-level string member.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int sg_buf_reserve(sg_buf *b, size_t extra)
{
    if (b->oom)
        return SMTPGATE_ERR;
    if (extra <= b->cap - b->len)
        return SMTPGATE_OK;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->oom = 1;
        return SMTPGATE_ERR;
    }
    size_t want = b->len + extra;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < want)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (p == NULL) {
        b->oom = 1;
        return SMTPGATE_ERR;
    }
    b->data = p;
    b->cap = cap;
    return SMTPGATE_OK;
}

int sg_buf_append(sg_buf *b, const void *p, size_t n)
{
    if (sg_buf_reserve(b, n + 1) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0'; /* always a C string too; the +1 above pays for it */
    return SMTPGATE_OK;
}

int sg_buf_puts(sg_buf *b, const char *s) { return sg_buf_append(b, s, strlen(s)); }

int sg_buf_putc(sg_buf *b, char ch) { return sg_buf_append(b, &ch, 1); }

void sg_buf_free(sg_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

/* RFC 3629 section 4, the well-formed byte sequences:
 *   00..7F | C2..DF 80..BF | E0 A0..BF 80..BF | E1..EC 80..BF 80..BF
 *   | ED 80..9F 80..BF | EE..EF 80..BF 80..BF | F0 90..BF 80..BF 80..BF
 *   | F1..F3 80..BF 80..BF 80..BF | F4 80..8F 80..BF 80..BF
 * The narrowed second-byte ranges exclude overlong forms (C0, C1, E0 80..9F,
 * F0 80..8F), surrogates (ED A0..BF) and code points above U+10FFFF (F4 90..). */
size_t sg_utf8_invalid_at(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else
            return i;
        if (len - i <= need)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= need; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF)
                return i;
        i += need + 1;
    }
    return (size_t)-1;
}

int sg_json_string(sg_buf *b, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    if (sg_utf8_invalid_at(s, len) != (size_t)-1)
        return SMTPGATE_ERR;
    /* Worst case every byte becomes \u00XX: 6 bytes, plus quotes. */
    if (len > (SIZE_MAX - 3) / 6 || sg_buf_reserve(b, len + 3) != SMTPGATE_OK)
        return SMTPGATE_ERR;
    sg_buf_putc(b, '"');
    size_t run = 0; /* start of the pending run of bytes copied as they are */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        sg_buf_append(b, s + run, i - run);
        run = i + 1;
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t n = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        }
        sg_buf_append(b, esc, n);
    }
    sg_buf_append(b, s + run, len - run);
    sg_buf_putc(b, '"');
    return b->oom ? SMTPGATE_ERR : SMTPGATE_OK;
}

size_t sg_base64_len(size_t n) { return (n + 2) / 3 * 4; }

void sg_base64_encode(char *out, const unsigned char *in, size_t n)
{
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = abc[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = '=';
        *out++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = '=';
    }
}

const char *sg_guess_content_type(const char *filename)
{
    static const char *const table[][2] = {
        {"txt", "text/plain"},        {"log", "text/plain"},
        {"csv", "text/csv"},          {"html", "text/html"},
        {"htm", "text/html"},         {"json", "application/json"},
        {"xml", "application/xml"},   {"pdf", "application/pdf"},
        {"zip", "application/zip"},   {"gz", "application/gzip"},
        {"png", "image/png"},         {"jpg", "image/jpeg"},
        {"jpeg", "image/jpeg"},       {"gif", "image/gif"},
        {"svg", "image/svg+xml"},     {"webp", "image/webp"},
    };
    const char *dot = strrchr(filename, '.');
    if (dot != NULL && strchr(dot, '/') == NULL) {
        for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
            const char *a = dot + 1, *e = table[i][0];
            while (*a && *e && (*a | 0x20) == *e)
                a++, e++;
            if (*a == '\0' && *e == '\0')
                return table[i][1];
        }
    }
    return "application/octet-stream";
}

/* ---- reading one member of a JSON object (RFC 8259) --------------------- */

#define SG_JSON_MAX_DEPTH 64

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char ch = p[i];
        v <<= 4;
        if (ch >= '0' && ch <= '9')
            v |= (unsigned)(ch - '0');
        else if ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'f')
            v |= (unsigned)((ch | 0x20) - 'a' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

static void put_utf8(sg_buf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 63));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12);
        u[1] = (char)(0x80 | ((cp >> 6) & 63));
        u[2] = (char)(0x80 | (cp & 63));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18);
        u[1] = (char)(0x80 | ((cp >> 12) & 63));
        u[2] = (char)(0x80 | ((cp >> 6) & 63));
        u[3] = (char)(0x80 | (cp & 63));
        n = 4;
    }
    sg_buf_append(b, u, n);
}

/* p at the opening quote. Returns the byte after the closing quote, or NULL
 * when malformed. Decoded text goes to out when out is not NULL. */
static const char *read_string(const char *p, sg_buf *out)
{
    if (*p++ != '"')
        return NULL;
    for (;;) {
        const char *run = p;
        while (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            p++;
        if (out)
            sg_buf_append(out, run, (size_t)(p - run));
        if (*p == '"')
            return p + 1;
        if (*p != '\\')
            return NULL; /* NUL (end of input) or a raw control character */
        p++;
        unsigned cp;
        switch (*p) {
        case '"': case '\\': case '/': cp = (unsigned char)*p; p++; break;
        case 'b': cp = '\b'; p++; break;
        case 'f': cp = '\f'; p++; break;
        case 'n': cp = '\n'; p++; break;
        case 'r': cp = '\r'; p++; break;
        case 't': cp = '\t'; p++; break;
        case 'u':
            if (hex4(p + 1, &cp) != 0)
                return NULL;
            p += 5;
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair, RFC 8259 section 7 */
                unsigned lo;
                if (p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) != 0 || lo < 0xDC00 ||
                    lo > 0xDFFF)
                    return NULL;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF)
                return NULL;
            break;
        default:
            return NULL;
        }
        if (out)
            put_utf8(out, cp);
    }
}

/* Returns the byte after one JSON value starting at p, or NULL when malformed. */
static const char *skip_value(const char *p, int depth)
{
    p = skip_ws(p);
    if (*p == '"')
        return read_string(p, NULL);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        if (depth >= SG_JSON_MAX_DEPTH)
            return NULL;
        p = skip_ws(p + 1);
        if (*p == close)
            return p + 1;
        for (;;) {
            if (close == '}') {
                p = read_string(skip_ws(p), NULL);
                if (p == NULL || *(p = skip_ws(p)) != ':')
                    return NULL;
                p++;
            }
            p = skip_value(p, depth + 1);
            if (p == NULL)
                return NULL;
            p = skip_ws(p);
            if (*p == close)
                return p + 1;
            if (*p++ != ',')
                return NULL;
        }
    }
    /* number, true, false, null: a run of their characters */
    const char *start = p;
    while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || *p == '-' || *p == '+' ||
           *p == '.' || *p == 'E')
        p++;
    return p == start ? NULL : p;
}

int smtpgate_json_get_string(const char *json, const char *key, char *out, size_t outlen)
{
    sg_buf name = {0}, value = {0};
    int rc = SMTPGATE_ERR;
    const char *p = skip_ws(json);
    if (*p++ != '{')
        return SMTPGATE_ERR;
    p = skip_ws(p);
    if (*p == '}')
        return SMTPGATE_ERR;
    for (;;) {
        name.len = 0;
        sg_buf_putc(&name, '\0'); /* an empty key still leaves a C string */
        name.len = 0;
        p = read_string(skip_ws(p), &name);
        if (p == NULL || name.oom || *(p = skip_ws(p)) != ':')
            break;
        p = skip_ws(p + 1);
        if (strcmp(name.data, key) == 0 && strlen(key) == name.len) {
            sg_buf_putc(&value, '\0');
            value.len = 0;
            if (*p != '"' || read_string(p, &value) == NULL || value.oom)
                break;
            if (value.len < outlen && memchr(value.data, '\0', value.len) == NULL) {
                memcpy(out, value.data, value.len);
                out[value.len] = '\0';
                rc = SMTPGATE_OK;
            }
            break;
        }
        p = skip_value(p, 1);
        if (p == NULL)
            break;
        p = skip_ws(p);
        if (*p++ != ',')
            break; /* '}' (key absent) or malformed */
    }
    sg_buf_free(&name);
    sg_buf_free(&value);
    return rc;
}
