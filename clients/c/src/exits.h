/* The exit codes of smtpgate-send and smtpgate-sendmail (sysexits.h, spelled
 * out: the values are sendmail's contract with its callers), one table with
 * `smtpgate send` and `smtpgate sendmail`: docs/exit-codes.md. Scripts and
 * PHP's mail() depend on them. Not part of the library. */
#ifndef SMTPGATE_EXITS_H
#define SMTPGATE_EXITS_H

#include <string.h>

enum {
    EX_OK = 0,           /* accepted (and, with --wait, sent) */
    EX_USAGE = 64,       /* the command line; sendmail: no recipients */
    EX_DATAERR = 65,     /* the message: invalid UTF-8, too large, BAD_REQUEST, BAD_HEADER, TOO_LARGE */
    EX_NOINPUT = 66,     /* an attachment or the token file cannot be read */
    EX_NOUSER = 67,      /* an address refused: BAD_ADDRESS, DENIED */
    EX_NOHOST = 68,      /* the daemon's host name does not resolve */
    EX_UNAVAILABLE = 69, /* refused for another reason; --wait: the message failed */
    EX_SOFTWARE = 70,    /* the peer does not speak the line protocol */
    EX_OSERR = 71,       /* sendmail: out of memory, exec of -bs failed */
    EX_TEMPFAIL = 75,    /* nothing stored: down, BUSY, INTERNAL; --wait: not final in time */
    EX_NOPERM = 77,      /* AUTH_REQUIRED, AUTH_FAILED */
    EX_CONFIG = 78       /* sendmail: the file named by $SMTPGATE_CONFIG cannot be read */
};

/* The exit code for the daemon's `ERR CODE`; a code not in the table (one a
 * newer daemon may add) is a refusal for good. */
static inline int exit_for_error(const char *code)
{
    static const struct {
        const char *code;
        int exit_code;
    } table[] = {
        {"BUSY", EX_TEMPFAIL},       {"INTERNAL", EX_TEMPFAIL},   {"BAD_ADDRESS", EX_NOUSER},
        {"DENIED", EX_NOUSER},       {"BAD_HEADER", EX_DATAERR},  {"TOO_LARGE", EX_DATAERR},
        {"BAD_REQUEST", EX_DATAERR}, {"AUTH_REQUIRED", EX_NOPERM}, {"AUTH_FAILED", EX_NOPERM},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(code, table[i].code) == 0)
            return table[i].exit_code;
    return EX_UNAVAILABLE;
}

#endif
