<?php

declare(strict_types=1);

namespace SmtpGate\Tests;

use SmtpGate\Attachment;
use SmtpGate\Client;
use SmtpGate\Exception\BadAddressException;
use SmtpGate\Tests\Support\DaemonTestCase;

/**
 * Every call of the client against a real daemon that relays to a real SMTP
 * server (its embedded aiosmtpd): what the calls return, and what arrived.
 */
final class ClientTest extends DaemonTestCase
{
    private const MESSAGE = ['from' => 'app@example.com', 'to' => 'kelly@example.org',
                             'subject' => '记得收衣服', 'text' => "今天我不回家\n晚饭自己吃。"];

    public function testSendStatusWaitPingHelloAndStats(): void
    {
        $daemon = $this->startDaemon();
        $gate = new Client($daemon->uri);
        $id = $gate->send(self::MESSAGE + ['cc' => 'cc@example.org', 'bcc' => ['hidden@example.org'],
                                           'html' => '<p>今天我不回家</p>']);

        $this->assertTrue($gate->ping());
        $this->assertStringStartsWith('smtpgate ', $gate->hello());
        $status = $gate->status($id);
        $this->assertSame($id, $status['id']);
        $this->assertContains($status['state'], ['queued', 'sending', 'sent']);
        $final = $gate->wait($id, 15);
        $this->assertSame('sent', $final['state']);
        $this->assertSame(
            ['cc@example.org' => 'sent', 'hidden@example.org' => 'sent', 'kelly@example.org' => 'sent'],
            self::recipientStates($final)
        );
        $this->assertArrayHasKey('version', $gate->stats());

        [$mail] = $daemon->received(1);
        $this->assertSame('app@example.com', $mail->envelopeFrom);
        $this->assertSame(['cc@example.org', 'hidden@example.org', 'kelly@example.org'], $mail->envelopeTo);
        $this->assertSame('记得收衣服', $mail->header('Subject'));
        $this->assertStringNotContainsString('hidden@example.org', $mail->data, 'Bcc stays out of the message');
        $this->assertSame(self::MESSAGE['text'], rtrim($mail->body(), "\n"));
        $this->assertStringContainsString('今天我不回家', $mail->body('text/html'));
    }

    public function testSendRawOverTheUnixSocketAndFailoverPastADaemonThatIsDown(): void
    {
        $daemon = $this->startDaemon();
        $raw = "From: App <app@example.com>\r\nTo: kelly@example.org\r\n"
             . 'Subject: =?UTF-8?B?' . base64_encode('原样') . "?=\r\n\r\nraw body line\r\n";
        $unix = new Client($daemon->unixUri);
        $failover = new Client([self::deadTcpUri(), $daemon->uri]);

        $rawId = $unix->sendRaw($raw, 'bounce@example.com', ['kelly@example.org']);
        $failoverId = $failover->send(['from' => 'app@example.com', 'to' => 'second@example.org',
                                       'text' => 'via failover']);

        $this->assertSame('sent', $unix->wait($rawId, 15)['state']);
        $this->assertSame($daemon->uri, $failover->endpoint());
        $this->assertSame('sent', $failover->wait($failoverId, 15)['state']);
        $byRecipient = [];
        foreach ($daemon->received(2) as $mail) {
            $byRecipient[$mail->envelopeTo[0]] = $mail;
        }
        $this->assertSame('bounce@example.com', $byRecipient['kelly@example.org']->envelopeFrom);
        $this->assertSame('原样', $byRecipient['kelly@example.org']->header('Subject'));
        $this->assertSame("raw body line\n", $byRecipient['kelly@example.org']->body());
        $this->assertSame('via failover', rtrim($byRecipient['second@example.org']->body(), "\n"));
    }

    public function testATenMegabyteAttachmentArrivesIntact(): void
    {
        $daemon = $this->startDaemon();
        $payload = random_bytes(10 * 1024 * 1024);
        $path = $daemon->folder . '/报表.bin';
        file_put_contents($path, $payload);
        $gate = new Client($daemon->uri, ['read_timeout' => 30]);
        $attachment = Attachment::fromFile($path, 'application/octet-stream');
        $id = $gate->send(['subject' => '附件', 'text' => '见附件', 'attachments' => [$attachment]] + self::MESSAGE);

        $this->assertSame('sent', $gate->wait($id, 30)['state']);
        [$mail] = $daemon->received(1);
        $this->assertSame(['报表.bin'], array_keys($mail->attachments()));
        $this->assertTrue($mail->attachments()['报表.bin'] === $payload, 'the attachment arrived changed');
    }

    public function testSendManyPipelinesAndReportsEachMessage(): void
    {
        $daemon = $this->startDaemon();
        $gate = new Client($daemon->uri);
        $messages = [];
        for ($i = 0; $i < 40; $i++) {
            $messages["m{$i}"] = ['from' => 'app@example.com', 'to' => "r{$i}@example.org",
                                  'subject' => "第{$i}封", 'text' => "正文 {$i}"];
        }
        $messages['bad'] = ['from' => 'app@example.com', 'to' => 'not an address'];

        $result = $gate->sendMany($messages);

        $this->assertFalse($result->ok());
        $this->assertSame(['bad'], array_keys($result->errors));
        $this->assertInstanceOf(BadAddressException::class, $result->errors['bad']);
        $this->assertSame(array_keys(array_slice($messages, 0, 40)), array_keys($result->ids));
        $this->assertCount(40, array_unique($result->ids));
        foreach ($result->ids as $id) {
            $this->assertSame('sent', $gate->wait($id, 15)['state']);
        }
        $subjects = array_map(static fn ($mail) => $mail->header('Subject'), $daemon->received(40));
        sort($subjects);
        $expected = array_column($messages, 'subject');
        sort($expected);
        $this->assertSame($expected, $subjects);
    }

    public function testSendManyAcrossManyPipelineWindows(): void
    {
        // 1500 SENDs: six windows of 256 on one connection, every reply
        // matched to its message. hold: stored, not relayed; only the
        // hand-off is under test.
        $daemon = $this->startDaemon(['hold' => true]);
        $gate = new Client($daemon->uri);

        $result = $gate->sendMany(array_fill(0, 1500, self::MESSAGE));

        $this->assertSame([], $result->errors);
        $this->assertCount(1500, array_unique($result->ids));
        $this->assertSame(range(0, 1499), array_keys($result->ids));
        $this->assertSame(1500, $gate->stats()['states']['queued']);
        $this->assertSame(1, $gate->stats()['intake']['connections']);
    }

    /** @return array<string, string> address => state, sorted by address */
    private static function recipientStates(array $status): array
    {
        $states = array_column($status['recipients'], 'state', 'address');
        ksort($states);
        return $states;
    }
}
