/* test_json.c: the UTF-8 check, the JSON string writer, base64 and the JSON member reader. */
#include <stdlib.h>

#include "harness.h"
#include "internal.h"

/* The JSON literal sg_json_string makes of len bytes, or NULL when refused. */
static char *escaped(const char *s, size_t len)
{
    static sg_buf b;
    sg_buf_free(&b);
    if (sg_json_string(&b, s, len) != SMTPGATE_OK) {
        sg_buf_free(&b);
        return NULL;
    }
    return b.data;
}

static void test_escapes_quotes_backslash_and_controls(void)
{
    CHECK_STR(escaped("plain", 5), "\"plain\"");
    CHECK_STR(escaped("", 0), "\"\"");
    CHECK_STR(escaped("a\"b\\c/d", 7), "\"a\\\"b\\\\c/d\"");
    CHECK_STR(escaped("\b\f\n\r\t", 5), "\"\\b\\f\\n\\r\\t\"");
    CHECK_STR(escaped("\x01\x1f\x7f", 3), "\"\\u0001\\u001f\x7f\"");
    CHECK_STR(escaped("a\0b", 3), "\"a\\u0000b\"");
    CHECK_STR(escaped("line1\r\nSubject: x", 17), "\"line1\\r\\nSubject: x\"");
    /* Non-ASCII UTF-8 goes out as it is: the protocol line is UTF-8. */
    CHECK_STR(escaped("记得收衣服", strlen("记得收衣服")), "\"记得收衣服\"");
    CHECK_STR(escaped("\xf0\x9f\x98\x80 \xe2\x80\xa8", 8), "\"\xf0\x9f\x98\x80 \xe2\x80\xa8\"");
}

static void test_refuses_invalid_utf8(void)
{
    static const struct {
        const char *bytes;
        size_t at;
    } bad[] = {
        {"\x80", 0},             /* lone continuation byte */
        {"ab\xc0\xaf", 2},       /* overlong '/' */
        {"\xc1\xbf", 0},         /* overlong */
        {"\xe0\x80\xaf", 0},     /* overlong 3-byte */
        {"\xf0\x80\x80\xaf", 0}, /* overlong 4-byte */
        {"\xed\xa0\x80", 0},     /* surrogate U+D800 */
        {"\xed\xbf\xbf", 0},     /* surrogate U+DFFF */
        {"\xf4\x90\x80\x80", 0}, /* U+110000 */
        {"\xf5\x80\x80\x80", 0}, /* lead byte above F4 */
        {"x\xe4\xb8", 1},        /* truncated at the end */
        {"\xe4\xb8x", 0},        /* truncated by an ASCII byte */
        {"\xff", 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t len = strlen(bad[i].bytes);
        CHECK(sg_utf8_invalid_at(bad[i].bytes, len) == bad[i].at);
        CHECK(escaped(bad[i].bytes, len) == NULL);
    }
}

/* Encodes a code point the textbook way, surrogates included (to test refusal). */
static size_t encode(unsigned cp, char *u)
{
    if (cp < 0x80) {
        u[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 63));
        return 2;
    }
    if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12);
        u[1] = (char)(0x80 | ((cp >> 6) & 63));
        u[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    u[0] = (char)(0xF0 | cp >> 18);
    u[1] = (char)(0x80 | ((cp >> 12) & 63));
    u[2] = (char)(0x80 | ((cp >> 6) & 63));
    u[3] = (char)(0x80 | (cp & 63));
    return 4;
}

static void test_every_code_point(void)
{
    int wrong = 0;
    for (unsigned cp = 0; cp <= 0x10FFFF; cp++) {
        char u[4];
        size_t n = encode(cp, u);
        int valid = sg_utf8_invalid_at(u, n) == (size_t)-1;
        int want = !(cp >= 0xD800 && cp <= 0xDFFF);
        wrong += valid != want;
    }
    CHECK(wrong == 0);
    /* Every overlong 2-byte form (C0/C1 lead) is refused. */
    for (unsigned lead = 0xC0; lead <= 0xC1; lead++)
        for (unsigned t = 0x80; t <= 0xBF; t++) {
            char u[2] = {(char)lead, (char)t};
            wrong += sg_utf8_invalid_at(u, 2) == (size_t)-1;
        }
    CHECK(wrong == 0);
}

/* What the writer escapes, the reader gives back byte for byte. */
static void test_round_trip_through_reader(void)
{
    static const char *const samples[] = {
        "", "plain", "quote \" and \\ backslash", "tab\tnewline\ncr\r", "\x01\x02\x1f",
        "今天我不回家", "emoji \xf0\x9f\x98\x80", "</script>",
    };
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++) {
        sg_buf json = {0};
        sg_buf_puts(&json, "{\"k\":");
        sg_json_string(&json, samples[i], strlen(samples[i]));
        sg_buf_puts(&json, "}");
        char out[128];
        CHECK(smtpgate_json_get_string(json.data, "k", out, sizeof out) == SMTPGATE_OK);
        CHECK_STR(out, samples[i]);
        sg_buf_free(&json);
    }
}

static void test_base64_rfc4648_vectors(void)
{
    static const char *const vec[][2] = {
        {"", ""},          {"f", "Zg=="},         {"fo", "Zm8="},        {"foo", "Zm9v"},
        {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="}, {"foobar", "Zm9vYmFy"},
    };
    for (size_t i = 0; i < sizeof vec / sizeof vec[0]; i++) {
        char out[16] = {0};
        size_t n = strlen(vec[i][0]);
        CHECK(sg_base64_len(n) == strlen(vec[i][1]));
        sg_base64_encode(out, (const unsigned char *)vec[i][0], n);
        CHECK_STR(out, vec[i][1]);
    }
    const unsigned char high[] = {0xff, 0xfe, 0xfd, 0x00};
    char out[16] = {0};
    sg_base64_encode(out, high, 4);
    CHECK_STR(out, "//79AA==");
}

static void test_get_string_member(void)
{
    char out[64];
    const char *state = "{\"id\":\"01J\",\"attempts\":1,\"recipients\":[{\"address\":\"a@x\","
                        "\"state\":\"failed\",\"reply\":\"550 5.1.1 no\"}],\"next_attempt\":null,"
                        "\"ok\":true,\"n\":-1.5e3,\"state\":\"sent\"}";
    CHECK(smtpgate_json_get_string(state, "state", out, sizeof out) == SMTPGATE_OK);
    CHECK_STR(out, "sent"); /* the top-level member, not the recipient's */
    CHECK(smtpgate_json_get_string(state, "id", out, sizeof out) == SMTPGATE_OK);
    CHECK_STR(out, "01J");
    CHECK(smtpgate_json_get_string(state, "address", out, sizeof out) == SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string(state, "attempts", out, sizeof out) == SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string(" { \"st\\u0061te\" : \"\\u00e9\\ud83d\\ude00\\/\" } ", "state",
                                   out, sizeof out) == SMTPGATE_OK);
    CHECK_STR(out, "\xc3\xa9\xf0\x9f\x98\x80/");
    CHECK(smtpgate_json_get_string("{\"state\":\"\"}", "state", out, sizeof out) == SMTPGATE_OK);
    CHECK_STR(out, "");
    /* Does not fit, malformed, truncated, lone surrogate, NUL inside, not an object. */
    CHECK(smtpgate_json_get_string("{\"state\":\"queued\"}", "state", out, 6) == SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("{\"state\":\"queued\"}", "state", out, 7) == SMTPGATE_OK);
    CHECK(smtpgate_json_get_string("{\"a\":[1,2,\"state\":\"x\"}", "state", out, sizeof out) ==
          SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("{\"state\":\"sen", "state", out, sizeof out) == SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("{\"state\":\"\\ud800\"}", "state", out, sizeof out) ==
          SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("{\"state\":\"a\\u0000b\"}", "state", out, sizeof out) ==
          SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("[\"state\"]", "state", out, sizeof out) == SMTPGATE_ERR);
    CHECK(smtpgate_json_get_string("{}", "state", out, sizeof out) == SMTPGATE_ERR);
    /* Nesting deeper than the reader's limit is refused, not a stack overflow. */
    char deep[400] = "{\"a\":";
    for (int i = 0; i < 100; i++)
        strcat(deep, "[");
    CHECK(smtpgate_json_get_string(deep, "state", out, sizeof out) == SMTPGATE_ERR);
}

static void test_guess_content_type(void)
{
    CHECK_STR(sg_guess_content_type("report.PDF"), "application/pdf");
    CHECK_STR(sg_guess_content_type("logs.tar.gz"), "application/gzip");
    CHECK_STR(sg_guess_content_type("graph.png"), "image/png");
    CHECK_STR(sg_guess_content_type("README"), "application/octet-stream");
    CHECK_STR(sg_guess_content_type("dir.d/file"), "application/octet-stream");
    CHECK_STR(sg_guess_content_type("x.pdfx"), "application/octet-stream");
}

int main(void)
{
    RUN(test_escapes_quotes_backslash_and_controls);
    RUN(test_refuses_invalid_utf8);
    RUN(test_every_code_point);
    RUN(test_round_trip_through_reader);
    RUN(test_base64_rfc4648_vectors);
    RUN(test_get_string_member);
    RUN(test_guess_content_type);
    return TEST_RESULT();
}
