/*
 * internal.h: pieces shared by the library's source files and its unit tests.
 * Not installed; nothing here is part of the public API.
 */
#ifndef SMTPGATE_INTERNAL_H
#define SMTPGATE_INTERNAL_H

#include <stddef.h>
#include <sys/types.h>

#include "smtpgate.h"

/* A growable byte buffer. After a failed allocation `oom` stays set and every
 * later append is a no-op, so a builder can check once at the end. */
typedef struct sg_buf {
    char *data;
    size_t len, cap;
    int oom;
} sg_buf;

int sg_buf_reserve(sg_buf *b, size_t extra);          /* SMTPGATE_OK or SMTPGATE_ERR (oom set) */
int sg_buf_append(sg_buf *b, const void *p, size_t n);
int sg_buf_puts(sg_buf *b, const char *s);
int sg_buf_putc(sg_buf *b, char ch);
void sg_buf_free(sg_buf *b);

/* Offset of the first byte that is not part of well-formed UTF-8 (RFC 3629:
 * no overlong forms, no surrogates, nothing above U+10FFFF), or (size_t)-1. */
size_t sg_utf8_invalid_at(const char *s, size_t len);

/* Appends s as a JSON string literal (RFC 8259 section 7): quotes, `"` and `\`
 * escaped, control characters U+0000..U+001F as \b \f \n \r \t or \u00XX.
 * Other UTF-8 bytes are copied as they are. SMTPGATE_ERR when s is not valid
 * UTF-8 (nothing appended then) or on OOM. */
int sg_json_string(sg_buf *b, const char *s, size_t len);

/* Standard base64 (RFC 4648 section 4) with padding and no line breaks. */
size_t sg_base64_len(size_t n);
void sg_base64_encode(char *out, const unsigned char *in, size_t n);

/* The content type for a filename's extension; application/octet-stream when unknown. */
const char *sg_guess_content_type(const char *filename);

/* Appends the SEND JSON object of m to b. SMTPGATE_ERR with a reason in
 * why (size SMTPGATE_ERRSTR_SIZE) when the message is incomplete or broken. */
int sg_msg_write_json(const smtpgate_msg *m, sg_buf *b, char *why);

/* True when a SEND of m can be repeated without queueing a second message. */
int sg_msg_has_idempotency_key(const smtpgate_msg *m);

/* Every write of the library goes through this pointer (send(2) by default),
 * so unit tests can count the calls and force short writes. */
extern ssize_t (*sg_send_hook)(int fd, const void *buf, size_t len, int flags);

#endif
