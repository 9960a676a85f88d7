/* test_reader.c: the reply reader without a socket (hiredis test_reply_reader,
 * h11 test_io: whole input, one byte at a time, trailing bytes kept). */
#include <stdlib.h>

#include "harness.h"
#include "smtpgate.h"

/* Feeds input whole (step 0) or in pieces of `step` bytes, calling get_reply
 * after each feed like an I/O layer does; returns the replies as text
 * "OK:payload|ERR:CODE:text|" and the reader's error (if any) after "#". */
static char *replies_of(const char *input, size_t len, size_t step, size_t max_line)
{
    static char out[1 << 21];
    smtpgate_reader *r = smtpgate_reader_new(max_line);
    size_t o = 0;
    out[0] = '\0';
    for (size_t fed = 0; fed < len || len == 0;) {
        size_t n = step && len - fed > step ? step : len - fed;
        if (smtpgate_reader_feed(r, input + fed, n) != SMTPGATE_OK)
            break;
        fed += n;
        smtpgate_reply *reply;
        int rc;
        while ((rc = smtpgate_reader_get_reply(r, &reply)) == SMTPGATE_OK && reply != NULL) {
            if (reply->type == SMTPGATE_REPLY_OK)
                o += (size_t)snprintf(out + o, sizeof out - o, "OK:%s|", reply->payload);
            else
                o += (size_t)snprintf(out + o, sizeof out - o, "ERR:%s:%s|", reply->code,
                                      reply->payload);
            smtpgate_reply_free(reply);
        }
        if (rc != SMTPGATE_OK || len == 0)
            break;
    }
    if (r->err)
        snprintf(out + o, sizeof out - o, "#%s", r->errstr);
    smtpgate_reader_free(r);
    return out;
}

/* Checks the same result for whole input and for byte-at-a-time feeding. */
#define CHECK_REPLIES(input, want)                                                   \
    do {                                                                             \
        CHECK_STR(replies_of(input, sizeof(input) - 1, 0, 0), want);                 \
        CHECK_STR(replies_of(input, sizeof(input) - 1, 1, 0), want);                 \
    } while (0)

static void test_ok_replies(void)
{
    CHECK_REPLIES("OK PONG\r\n", "OK:PONG|");
    CHECK_REPLIES("OK\r\n", "OK:|");
    CHECK_REPLIES("OK 01JD3Q7Z8K4W6X2V9N5B0C1T\r\n", "OK:01JD3Q7Z8K4W6X2V9N5B0C1T|");
    CHECK_REPLIES("OK {\"state\":\"sent\",\"r\":\"a b\"}\r\n", "OK:{\"state\":\"sent\",\"r\":\"a b\"}|");
    CHECK_REPLIES("OK smtpgate 1 0.1.0\n", "OK:smtpgate 1 0.1.0|"); /* bare LF tolerated */
    CHECK_REPLIES("OK 记得\r\n", "OK:记得|");
}

static void test_err_replies(void)
{
    CHECK_REPLIES("ERR BAD_ADDRESS not an address: x@\r\n", "ERR:BAD_ADDRESS:not an address: x@|");
    CHECK_REPLIES("ERR BUSY\r\n", "ERR:BUSY:|");
    CHECK_REPLIES("ERR AUTH_REQUIRED send AUTH first\r\n", "ERR:AUTH_REQUIRED:send AUTH first|");
}

static void test_pipelined_replies_in_order(void)
{
    CHECK_REPLIES("OK a\r\nERR DENIED no\r\nOK\r\nOK b\r\n", "OK:a|ERR:DENIED:no|OK:|OK:b|");
}

static void test_trailing_bytes_wait_for_more(void)
{
    smtpgate_reader *r = smtpgate_reader_new(0);
    smtpgate_reply *reply;
    CHECK(smtpgate_reader_feed(r, "OK a\r\nOK b\r", 11) == SMTPGATE_OK);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply != NULL);
    CHECK_STR(reply ? reply->payload : NULL, "a");
    smtpgate_reply_free(reply);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply == NULL);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply == NULL);
    CHECK(smtpgate_reader_feed(r, "\n", 1) == SMTPGATE_OK);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply != NULL);
    CHECK_STR(reply ? reply->payload : NULL, "b");
    CHECK(reply && reply->len == 1);
    smtpgate_reply_free(reply);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply == NULL);
    smtpgate_reader_free(r);
}

static void test_malformed_lines_are_protocol_errors(void)
{
    CHECK_REPLIES("HTTP/1.1 200 OK\r\n", "#unexpected reply: \"HTTP/1.1 200 OK\"");
    CHECK_REPLIES("OKAY\r\n", "#unexpected reply: \"OKAY\"");
    CHECK_REPLIES("ok PONG\r\n", "#unexpected reply: \"ok PONG\"");
    CHECK_REPLIES("ERR\r\n", "#unexpected reply: \"ERR\"");
    CHECK_REPLIES("ERR \r\n", "#unexpected reply: \"ERR \"");
    CHECK_REPLIES("ERR  text\r\n", "#bad error code in reply: \"ERR  text\"");
    CHECK_REPLIES("ERR ABCDEFGHIJKLMNOPQRSTUVWXYZ012345 x\r\n",
                  "#bad error code in reply: \"ERR ABCDEFGHIJKLMNOPQRSTUVWXYZ012345 x\"");
    CHECK_REPLIES("OK a\0b\r\n", "#NUL byte in reply: \"OK a?b\"");
    CHECK_REPLIES("\r\n", "#unexpected reply: \"\"");
    /* A good reply before the bad line still comes out, then the error. */
    CHECK_REPLIES("OK 1\r\n220 smtp.example.com ESMTP\r\nOK 2\r\n",
                  "OK:1|#unexpected reply: \"220 smtp.example.com ESMTP\"");
}

static void test_error_is_sticky(void)
{
    smtpgate_reader *r = smtpgate_reader_new(0);
    smtpgate_reply *reply;
    smtpgate_reader_feed(r, "NO\r\n", 4);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_ERR && reply == NULL);
    CHECK(r->err == SMTPGATE_ERR_PROTOCOL);
    CHECK(smtpgate_reader_feed(r, "OK\r\n", 4) == SMTPGATE_ERR);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_ERR && reply == NULL);
    smtpgate_reader_free(r);
}

static void test_line_length_is_bounded(void)
{
    /* max_line 16: 16 bytes of line plus CRLF pass; one more byte does not. */
    CHECK_STR(replies_of("OK 0123456789abc\r\n", 18, 0, 16), "OK:0123456789abc|");
    CHECK_STR(replies_of("OK 0123456789abc\r\n", 18, 1, 16), "OK:0123456789abc|");
    CHECK_STR(replies_of("OK 0123456789abcd\r\n", 19, 0, 16),
              "#reply line longer than 16 bytes: \"OK 0123456789abcd\"");
    /* Without any LF the reader gives up as soon as the limit is passed,
     * not when the peer stops sending. */
    CHECK_STR(replies_of("OK 0123456789abcdefghijklmnopqrstuvwxyz", 39, 1, 16),
              "#reply line longer than 16 bytes: \"OK 0123456789abcde\"");
    smtpgate_reader *r = smtpgate_reader_new(16);
    smtpgate_reply *reply;
    smtpgate_reader_feed(r, "OK 0123456789abcdefghijklmnopqrstuvwxyz", 39);
    CHECK(smtpgate_reader_get_reply(r, &reply) == SMTPGATE_ERR);
    CHECK(r->err == SMTPGATE_ERR_PROTOCOL);
    smtpgate_reader_free(r);
}

static void test_large_payload_in_chunks(void)
{
    size_t n = 1000000;
    char *input = malloc(n + 6);
    memcpy(input, "OK ", 3);
    for (size_t i = 3; i < n; i++)
        input[i] = (char)('a' + i % 26);
    memcpy(input + n, "\r\nOK\r\n", 6);
    smtpgate_reader *r = smtpgate_reader_new(0);
    smtpgate_reply *reply = NULL, *got = NULL;
    int replies = 0;
    for (size_t fed = 0; fed < n + 6; fed += 1000) {
        size_t k = n + 6 - fed < 1000 ? n + 6 - fed : 1000;
        CHECK(smtpgate_reader_feed(r, input + fed, k) == SMTPGATE_OK);
        while (smtpgate_reader_get_reply(r, &reply) == SMTPGATE_OK && reply != NULL) {
            if (replies++ == 0)
                got = reply;
            else
                smtpgate_reply_free(reply);
        }
    }
    CHECK(replies == 2);
    CHECK(got != NULL && got->len == n - 3 && memcmp(got->payload, input + 3, n - 3) == 0);
    smtpgate_reply_free(got);
    smtpgate_reader_free(r);
    free(input);
}

int main(void)
{
    RUN(test_ok_replies);
    RUN(test_err_replies);
    RUN(test_pipelined_replies_in_order);
    RUN(test_trailing_bytes_wait_for_more);
    RUN(test_malformed_lines_are_protocol_errors);
    RUN(test_error_is_sticky);
    RUN(test_line_length_is_bounded);
    RUN(test_large_payload_in_chunks);
    return TEST_RESULT();
}
