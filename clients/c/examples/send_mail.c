/* Sends one mail through smtpgate and waits up to 30 s for the upstream's verdict.
 *     cc send_mail.c $(pkg-config --cflags --libs smtpgate) -o send_mail && ./send_mail */
#include <stdio.h>
#include <stdlib.h>

#include "smtpgate.h"

int main(void)
{
    const char *server = getenv("SMTPGATE_SERVER") ? getenv("SMTPGATE_SERVER") : "tcp://127.0.0.1:2526";
    smtpgate_ctx *c = smtpgate_connect(server, 5000);
    if (c == NULL || c->err) {
        fprintf(stderr, "connect: %s\n", c ? c->errstr : "out of memory");
        smtpgate_free(c);
        return 3;
    }
    smtpgate_msg *m = smtpgate_msg_new();
    smtpgate_msg_set_from(m, "监控 <monitor@example.com>");
    smtpgate_msg_add_to(m, "kelly@example.org");
    smtpgate_msg_set_subject(m, "记得收衣服");
    smtpgate_msg_set_text(m, "今天我不回家\n");
    smtpgate_msg_attach(m, "note.txt", NULL, NULL, "hello\n", 6);

    char id[SMTPGATE_ID_SIZE];
    smtpgate_state state = SMTPGATE_STATE_UNKNOWN;
    int rc = smtpgate_send(c, m, id, sizeof id);
    if (rc == SMTPGATE_OK) {
        printf("queued as %s\n", id);
        rc = smtpgate_wait(c, id, 30, &state, NULL);
    }
    if (rc != SMTPGATE_OK)
        fprintf(stderr, "smtpgate: %s (code %s)\n", c->errstr, c->code[0] ? c->code : "-");
    else
        printf("%s\n", smtpgate_state_name(state));
    smtpgate_msg_free(m);
    smtpgate_free(c);
    return rc == SMTPGATE_OK && state == SMTPGATE_STATE_SENT ? 0 : 1;
}
