/*
 * smtpgate.h: C client of the smtpgate line protocol (docs/protocol.md, version 1).
 *
 * One header, no dependencies beyond libc and POSIX sockets. The shape follows
 * hiredis: a context carries the connection and the last error (`err` is one
 * of the SMTPGATE_ERR_* classes, `errstr` says what happened); every call
 * returns SMTPGATE_OK or SMTPGATE_ERR. A reply reader that needs no socket
 * parses the daemon's reply lines and can be fed bytes by any I/O layer.
 *
 *     smtpgate_ctx *c = smtpgate_connect("tcp://127.0.0.1:2526", 5000);
 *     if (c == NULL || c->err) { ... c ? c->errstr : "out of memory" ... }
 *     smtpgate_msg *m = smtpgate_msg_new();
 *     smtpgate_msg_set_from(m, "app@example.com");
 *     smtpgate_msg_add_to(m, "kelly@example.org");
 *     smtpgate_msg_set_subject(m, "记得收衣服");
 *     smtpgate_msg_set_text(m, "今天我不回家");
 *     char id[SMTPGATE_ID_SIZE];
 *     if (smtpgate_send(c, m, id, sizeof id) != SMTPGATE_OK) { ... c->errstr ... }
 *     smtpgate_msg_free(m);
 *     smtpgate_free(c);
 */
#ifndef SMTPGATE_H
#define SMTPGATE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMTPGATE_MAJOR 0
#define SMTPGATE_MINOR 1
#define SMTPGATE_PATCH 0
#define SMTPGATE_VERSION "0.1.0"
#define SMTPGATE_PROTOCOL_VERSION 1

#define SMTPGATE_OK 0
#define SMTPGATE_ERR -1

/* Error classes, kept in ctx->err (0 while no error happened). */
#define SMTPGATE_ERR_IO 1       /* a socket call failed; see errno text in errstr */
#define SMTPGATE_ERR_EOF 3      /* the daemon closed the connection */
#define SMTPGATE_ERR_PROTOCOL 4 /* a reply that is not `OK[ PAYLOAD]` / `ERR CODE TEXT` */
#define SMTPGATE_ERR_OOM 5      /* malloc failed */
#define SMTPGATE_ERR_TIMEOUT 6  /* connect, write or read took longer than allowed */
#define SMTPGATE_ERR_SERVER 7   /* the daemon answered `ERR CODE TEXT`; CODE in ctx->code */
#define SMTPGATE_ERR_INVALID 8  /* the caller's input was refused before anything was sent
                                   (invalid UTF-8, CR/LF in a token or id, unreadable file) */

/* An id from the daemon (a ULID today: 26 characters) fits with room to spare. */
#define SMTPGATE_ID_SIZE 128
/* The daemon's error CODEs are short tokens (BAD_ADDRESS, AUTH_REQUIRED, ...). */
#define SMTPGATE_CODE_SIZE 32
#define SMTPGATE_ERRSTR_SIZE 128

/* Default cap on one reply line. STATUS carries one object per recipient of
 * at most ~1.3 KB (address 256 octets and a 512-octet SMTP reply line, RFC 5321
 * 4.5.3.1, both JSON-escaped), so 4 MiB covers thousands of recipients while
 * keeping a broken peer from growing the buffer without end. */
#define SMTPGATE_READER_MAX_LINE (4u * 1024u * 1024u)

/* ------------------------------------------------------------------------ */
/* Reply reader (sans-IO): feed bytes, take complete replies out.            */

#define SMTPGATE_REPLY_OK 1
#define SMTPGATE_REPLY_ERR 2

typedef struct smtpgate_reply {
    int type;            /* SMTPGATE_REPLY_OK or SMTPGATE_REPLY_ERR */
    char *payload;       /* OK: the payload after "OK " ("" for a bare OK);
                            ERR: the TEXT after the code ("" when absent). NUL-terminated */
    size_t len;          /* strlen(payload) */
    char code[SMTPGATE_CODE_SIZE]; /* ERR: the CODE token; "" for OK */
} smtpgate_reply;

typedef struct smtpgate_reader {
    int err;                          /* 0 or SMTPGATE_ERR_PROTOCOL / _OOM; sticky */
    char errstr[SMTPGATE_ERRSTR_SIZE];
    /* private */
    char *buf;
    size_t len, pos, cap, scanned, max_line;
} smtpgate_reader;

/* A reader whose lines may be at most max_line bytes (0: SMTPGATE_READER_MAX_LINE); NULL on OOM. */
smtpgate_reader *smtpgate_reader_new(size_t max_line);
void smtpgate_reader_free(smtpgate_reader *r);
/* Appends bytes; SMTPGATE_ERR (r->err set) on OOM or after an earlier error. */
int smtpgate_reader_feed(smtpgate_reader *r, const char *buf, size_t len);
/* *reply = the next complete reply (free with smtpgate_reply_free) or NULL when
 * more bytes are needed. SMTPGATE_ERR on a malformed or overlong line: the
 * error is sticky, the stream cannot be resynchronised. */
int smtpgate_reader_get_reply(smtpgate_reader *r, smtpgate_reply **reply);
void smtpgate_reply_free(smtpgate_reply *reply);

/* ------------------------------------------------------------------------ */
/* Message builder. Every setter validates its input (UTF-8, required shape);
 * the first failure is kept in the message and reported by smtpgate_send,
 * so a caller may make all calls and check once.                            */

typedef struct smtpgate_msg smtpgate_msg;

smtpgate_msg *smtpgate_msg_new(void);
void smtpgate_msg_free(smtpgate_msg *m);
/* The first error met while building ("subject: invalid UTF-8 at byte 3"), or NULL. */
const char *smtpgate_msg_error(const smtpgate_msg *m);

int smtpgate_msg_set_from(smtpgate_msg *m, const char *addr);
int smtpgate_msg_add_to(smtpgate_msg *m, const char *addr);
int smtpgate_msg_add_cc(smtpgate_msg *m, const char *addr);
int smtpgate_msg_add_bcc(smtpgate_msg *m, const char *addr);
int smtpgate_msg_add_reply_to(smtpgate_msg *m, const char *addr);
int smtpgate_msg_set_subject(smtpgate_msg *m, const char *subject);
int smtpgate_msg_set_text(smtpgate_msg *m, const char *text);
int smtpgate_msg_set_html(smtpgate_msg *m, const char *html);
/* Bodies given with a length (may come from a file or a pipe). */
int smtpgate_msg_set_text_n(smtpgate_msg *m, const char *text, size_t len);
int smtpgate_msg_set_html_n(smtpgate_msg *m, const char *html, size_t len);
int smtpgate_msg_add_header(smtpgate_msg *m, const char *name, const char *value);
int smtpgate_msg_set_idempotency_key(smtpgate_msg *m, const char *key);
/* Attachments are base64-encoded by the library. content_type NULL: guessed
 * from the filename's extension (application/octet-stream otherwise);
 * content_id NULL unless the part is an inline image referenced by cid:. */
int smtpgate_msg_attach(smtpgate_msg *m, const char *filename, const char *content_type,
                        const char *content_id, const void *data, size_t len);
/* Reads path; filename NULL: the path's last component. */
int smtpgate_msg_attach_file(smtpgate_msg *m, const char *path, const char *filename,
                             const char *content_type);
/* The SEND JSON object as a malloc'd NUL-terminated string (*len set when not
 * NULL), or NULL when the message has an error or memory ran out. */
char *smtpgate_msg_json(const smtpgate_msg *m, size_t *len);

/* ------------------------------------------------------------------------ */
/* Connection context.                                                       */

typedef enum smtpgate_state {
    SMTPGATE_STATE_UNKNOWN = 0,
    SMTPGATE_STATE_QUEUED,
    SMTPGATE_STATE_SENDING,
    SMTPGATE_STATE_DEFERRED,
    SMTPGATE_STATE_SENT,
    SMTPGATE_STATE_FAILED
} smtpgate_state;

typedef struct smtpgate_ctx {
    int err;                           /* 0 or SMTPGATE_ERR_* of the last failed call */
    char errstr[SMTPGATE_ERRSTR_SIZE]; /* for people; never contains the token */
    char code[SMTPGATE_CODE_SIZE];     /* the daemon's CODE when err == SMTPGATE_ERR_SERVER */
    int fd;                            /* the socket, -1 while not connected */
    int request_sent;                  /* 1 once the last call's request was written whole: if
                                          the call then failed without an `ERR` reply (timeout,
                                          EOF, a reply that is not the protocol), the daemon
                                          may have acted on it (a SEND may be stored) */
    /* private */
    char *uri;
    char *token;
    int connect_timeout_ms;
    int io_timeout_ms;
    smtpgate_reader *reader;
} smtpgate_ctx;

/* Connects to "tcp://HOST:PORT" (HOST may be [v6addr]) or "unix:///PATH",
 * giving up after timeout_ms (also the default read/write timeout; <= 0: 10 s).
 * Returns NULL only when memory ran out; otherwise check ctx->err. */
smtpgate_ctx *smtpgate_connect(const char *uri, int timeout_ms);
/* Closes the socket, wipes the token, frees everything. NULL is fine. */
void smtpgate_free(smtpgate_ctx *c);
/* Closes and opens the connection again to the same URI, repeating AUTH. */
int smtpgate_reconnect(smtpgate_ctx *c);
/* Time allowed for writing one request and reading its reply (ms, > 0). */
int smtpgate_set_timeout(smtpgate_ctx *c, int timeout_ms);

/* AUTH <token>. The token is kept (wiped on free) to authenticate again after a
 * reconnect; only an `ERR AUTH_FAILED` drops it (not BUSY, INTERNAL, a timeout). */
int smtpgate_auth(smtpgate_ctx *c, const char *token);
int smtpgate_ping(smtpgate_ctx *c);
/* Sends the message; the daemon's id goes into id, which must hold
 * SMTPGATE_ID_SIZE bytes: id NULL or idlen < SMTPGATE_ID_SIZE is
 * SMTPGATE_ERR_INVALID before anything is sent (afterwards the message could
 * be stored with its id lost, and a retry would queue it twice). */
int smtpgate_send(smtpgate_ctx *c, const smtpgate_msg *m, char *id, size_t idlen);
/* SEND with a JSON object made by the caller (one line: no raw CR/LF); id as above. */
int smtpgate_send_json(smtpgate_ctx *c, const char *json, char *id, size_t idlen);
/* STATUS <id>: *state set; *json (if not NULL) gets the malloc'd state object. */
int smtpgate_status(smtpgate_ctx *c, const char *id, smtpgate_state *state, char **json);
/* WAIT <id> <seconds>: like status, once the message is final or the time is up.
 * The read timeout is extended by the seconds waited. */
int smtpgate_wait(smtpgate_ctx *c, const char *id, int seconds, smtpgate_state *state,
                  char **json);
/* Any one-line request ("STATS", "HELLO 1"); *payload (if not NULL) gets the
 * malloc'd OK payload. */
int smtpgate_command(smtpgate_ctx *c, const char *line, char **payload);

/* "queued", "sent", ... for a state; "unknown" for SMTPGATE_STATE_UNKNOWN. */
const char *smtpgate_state_name(smtpgate_state s);
smtpgate_state smtpgate_state_parse(const char *name);

/* Copies the top-level string member `key` of a JSON object into out,
 * decoding escapes. SMTPGATE_OK, or SMTPGATE_ERR when the member is absent,
 * not a string, does not fit or the JSON is malformed. */
int smtpgate_json_get_string(const char *json, const char *key, char *out, size_t outlen);

#ifdef __cplusplus
}
#endif

#endif /* SMTPGATE_H */
