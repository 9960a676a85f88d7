/* test_msg.c: the message builder and the exact JSON it writes. */
#include <stdlib.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h"

static char *json_of(const smtpgate_msg *m)
{
    static char *last;
    free(last);
    last = smtpgate_msg_json(m, NULL);
    return last;
}

static void test_full_message_json(void)
{
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "Ops \"Bot\" <app@example.com>");
    smtpgate_msg_add_to(m, "kelly@example.org");
    smtpgate_msg_add_to(m, "李雷 <lilei@example.cn>");
    smtpgate_msg_add_cc(m, "cc@example.org");
    smtpgate_msg_add_bcc(m, "audit@example.org");
    smtpgate_msg_add_reply_to(m, "help@example.com");
    smtpgate_msg_set_subject(m, "记得收衣服");
    smtpgate_msg_set_text(m, "line 1\nline \"2\"\t\\end");
    smtpgate_msg_set_html(m, "<p>今天</p>");
    smtpgate_msg_add_header(m, "X-Priority", "1");
    smtpgate_msg_attach(m, "hello.txt", NULL, NULL, "hello", 5);
    smtpgate_msg_attach(m, "logo.png", "image/png", "logo@x", "\x89PNG", 4);
    smtpgate_msg_set_idempotency_key(m, "alert-42");
    CHECK(smtpgate_msg_error(m) == NULL);
    size_t len = 0;
    char *json = smtpgate_msg_json(m, &len);
    CHECK_STR(json,
              "{\"from\":\"Ops \\\"Bot\\\" <app@example.com>\","
              "\"to\":[\"kelly@example.org\",\"李雷 <lilei@example.cn>\"],"
              "\"cc\":[\"cc@example.org\"],\"bcc\":[\"audit@example.org\"],"
              "\"reply_to\":[\"help@example.com\"],"
              "\"subject\":\"记得收衣服\","
              "\"text\":\"line 1\\nline \\\"2\\\"\\t\\\\end\","
              "\"html\":\"<p>今天</p>\","
              "\"headers\":{\"X-Priority\":\"1\"},"
              "\"attachments\":[{\"filename\":\"hello.txt\",\"content_type\":\"text/plain\","
              "\"content_base64\":\"aGVsbG8=\"},"
              "{\"filename\":\"logo.png\",\"content_type\":\"image/png\",\"content_id\":\"logo@x\","
              "\"content_base64\":\"iVBORw==\"}],"
              "\"idempotency_key\":\"alert-42\"}");
    CHECK(json != NULL && len == strlen(json));
    free(json);
    smtpgate_msg_free(m);
}

static void test_minimal_message_and_replaced_fields(void)
{
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "a@x");
    smtpgate_msg_add_bcc(m, "b@y");
    smtpgate_msg_set_subject(m, "first");
    smtpgate_msg_set_subject(m, "second");
    smtpgate_msg_set_text_n(m, "a\0b", 3);
    smtpgate_msg_attach(m, "empty.bin", NULL, NULL, NULL, 0);
    CHECK_STR(json_of(m), "{\"from\":\"a@x\",\"bcc\":[\"b@y\"],\"subject\":\"second\","
                          "\"text\":\"a\\u0000b\",\"attachments\":[{\"filename\":\"empty.bin\","
                          "\"content_type\":\"application/octet-stream\",\"content_base64\":\"\"}]}");
    smtpgate_msg_free(m);
}

static void test_missing_parts(void)
{
    char why[SMTPGATE_ERRSTR_SIZE];
    sg_buf b = {0};
    smtpgate_msg *m = smtpgate_msg_new();
    CHECK(sg_msg_write_json(m, &b, why) == SMTPGATE_ERR);
    CHECK_STR(why, "from is required");
    smtpgate_msg_set_from(m, "a@x");
    CHECK(json_of(m) == NULL);
    b.len = 0;
    CHECK(sg_msg_write_json(m, &b, why) == SMTPGATE_ERR);
    CHECK_STR(why, "no recipient: add to, cc or bcc");
    smtpgate_msg_add_cc(m, "c@x");
    CHECK_STR(json_of(m), "{\"from\":\"a@x\",\"cc\":[\"c@x\"]}");
    sg_buf_free(&b);
    smtpgate_msg_free(m);
}

static void test_invalid_utf8_is_refused_and_sticky(void)
{
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "a@x");
    smtpgate_msg_add_to(m, "b@y");
    CHECK(smtpgate_msg_set_subject(m, "ok\xc3") == SMTPGATE_ERR);
    CHECK_STR(smtpgate_msg_error(m), "subject: invalid UTF-8 at byte 2");
    /* The first error stays; later calls do nothing and fail. */
    CHECK(smtpgate_msg_set_text(m, "fine") == SMTPGATE_ERR);
    CHECK(smtpgate_msg_add_to(m, "\xff") == SMTPGATE_ERR);
    CHECK_STR(smtpgate_msg_error(m), "subject: invalid UTF-8 at byte 2");
    CHECK(json_of(m) == NULL);
    smtpgate_msg_free(m);

    m = smtpgate_msg_new();
    CHECK(smtpgate_msg_add_header(m, "X-A", "caf\xe9") == SMTPGATE_ERR);
    CHECK_STR(smtpgate_msg_error(m), "header value: invalid UTF-8 at byte 3");
    smtpgate_msg_free(m);

    m = smtpgate_msg_new();
    CHECK(smtpgate_msg_add_to(m, NULL) == SMTPGATE_ERR);
    CHECK_STR(smtpgate_msg_error(m), "to: NULL");
    smtpgate_msg_free(m);
}

static void test_attach_file(void)
{
    char dir[] = "/tmp/sgtestXXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[64];
    snprintf(path, sizeof path, "%s/report.csv", dir);
    FILE *f = fopen(path, "wb");
    unsigned char bytes[256];
    for (int i = 0; i < 256; i++)
        bytes[i] = (unsigned char)i;
    fwrite(bytes, 1, sizeof bytes, f);
    fclose(f);

    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "a@x");
    smtpgate_msg_add_to(m, "b@y");
    CHECK(smtpgate_msg_attach_file(m, path, NULL, NULL) == SMTPGATE_OK);
    CHECK(smtpgate_msg_attach_file(m, path, "renamed.bin", "application/x-test") == SMTPGATE_OK);
    char b64[400] = {0};
    sg_base64_encode(b64, bytes, sizeof bytes);
    char want[1200];
    snprintf(want, sizeof want,
             "{\"from\":\"a@x\",\"to\":[\"b@y\"],\"attachments\":["
             "{\"filename\":\"report.csv\",\"content_type\":\"text/csv\",\"content_base64\":\"%s\"},"
             "{\"filename\":\"renamed.bin\",\"content_type\":\"application/x-test\","
             "\"content_base64\":\"%s\"}]}",
             b64, b64);
    CHECK_STR(json_of(m), want);
    smtpgate_msg_free(m);

    m = smtpgate_msg_new();
    snprintf(path, sizeof path, "%s/missing.pdf", dir);
    CHECK(smtpgate_msg_attach_file(m, path, NULL, NULL) == SMTPGATE_ERR);
    char msg[200];
    snprintf(msg, sizeof msg, "attachment %s: No such file or directory", path);
    CHECK_STR(smtpgate_msg_error(m), msg);
    smtpgate_msg_free(m);

    snprintf(path, sizeof path, "%s/report.csv", dir);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    RUN(test_full_message_json);
    RUN(test_minimal_message_and_replaced_fields);
    RUN(test_missing_parts);
    RUN(test_invalid_utf8_is_refused_and_sticky);
    RUN(test_attach_file);
    return TEST_RESULT();
}
