<?php

declare(strict_types=1);

namespace SmtpGate\Tests;

use PHPUnit\Framework\TestCase;
use SmtpGate\Exception\WebhookVerificationException;
use SmtpGate\Webhook;

/**
 * SmtpGate\Webhook against requests signed by the daemon's own signer
 * (smtpgate.webhooks.signing, run under $SMTPGATE_TEST_PYTHON): what a PHP
 * receiver gets from smtpgate verifies, and a wrong secret, a changed body or
 * id, a stale timestamp or a missing header does not.
 */
final class WebhookTest extends TestCase
{
    private const SECRET = 'whsec_c210cGdhdGUgd2ViaG9vayB0ZXN0IHNlY3JldCwgMzJC';
    private const OTHER_SECRET = 'whsec_YW5vdGhlciBzZWNyZXQgb2YgYXQgbGVhc3QgMjQgYnl0ZXM=';
    private const BODY = '{"type":"message.sent","timestamp":"2026-12-06T13:04:05.123Z",'
        . '"data":{"message_id":"01JEXAMPLE","caller":"shop","state":"sent","subject":"记得收衣服"}}';

    public function testARequestSignedBySmtpgateVerifies(): void
    {
        $now = time();
        $headers = self::signed(self::SECRET, 'evt_01JEXAMPLE', $now, self::BODY);
        $event = (new Webhook(self::SECRET))->verify(self::BODY, $headers);
        self::assertSame('message.sent', $event['type']);
        self::assertSame('记得收衣服', $event['data']['subject']);
        self::assertSame('01JEXAMPLE', $event['data']['message_id']);
    }

    public function testServerVariablesAndListsOfHeadersAreAccepted(): void
    {
        $now = time();
        $headers = self::signed(self::SECRET, 'evt_1', $now, self::BODY);
        $server = ['REQUEST_METHOD' => 'POST', 'HTTP_WEBHOOK_ID' => $headers['webhook-id'],
                   'HTTP_WEBHOOK_TIMESTAMP' => $headers['webhook-timestamp'],
                   'HTTP_WEBHOOK_SIGNATURE' => $headers['webhook-signature']];
        self::assertSame('message.sent', (new Webhook(self::SECRET))->verify(self::BODY, $server)['type']);
        $psr7 = ['Webhook-Id' => [$headers['webhook-id']], 'Webhook-Timestamp' => [$headers['webhook-timestamp']],
                 'Webhook-Signature' => [$headers['webhook-signature']]];
        self::assertSame('message.sent', (new Webhook(self::SECRET))->verify(self::BODY, $psr7)['type']);
    }

    public function testOneMatchingSignatureOfARotationListIsEnough(): void
    {
        $now = time();
        $old = self::signed(self::OTHER_SECRET, 'evt_1', $now, self::BODY);
        $new = self::signed(self::SECRET, 'evt_1', $now, self::BODY);
        $new['webhook-signature'] = $old['webhook-signature'] . ' ' . $new['webhook-signature'];
        self::assertSame('message.sent', (new Webhook(self::SECRET))->verify(self::BODY, $new)['type']);
    }

    public function testAWrongSecretIsRejected(): void
    {
        $headers = self::signed(self::OTHER_SECRET, 'evt_1', time(), self::BODY);
        $this->expectException(WebhookVerificationException::class);
        $this->expectExceptionMessage('no signature matches the body');
        (new Webhook(self::SECRET))->verify(self::BODY, $headers);
    }

    public function testAChangedBodyOrIdIsRejected(): void
    {
        $now = time();
        $headers = self::signed(self::SECRET, 'evt_1', $now, self::BODY);
        $hook = new Webhook(self::SECRET);
        foreach ([[self::BODY . ' ', $headers], [self::BODY, ['webhook-id' => 'evt_2'] + $headers]] as [$body, $sent]) {
            try {
                $hook->verify($body, $sent);
                self::fail('a changed request verified');
            } catch (WebhookVerificationException $e) {
                self::assertStringContainsString('no signature matches', $e->getMessage());
            }
        }
    }

    public function testATimestampOutsideTheToleranceIsAReplay(): void
    {
        $now = time();
        $headers = self::signed(self::SECRET, 'evt_1', $now - 301, self::BODY);
        $this->expectException(WebhookVerificationException::class);
        $this->expectExceptionMessage('more than 300 s away from now');
        (new Webhook(self::SECRET))->verify(self::BODY, $headers, $now);
    }

    public function testAMissingHeaderIsRejected(): void
    {
        $headers = self::signed(self::SECRET, 'evt_1', time(), self::BODY);
        unset($headers['webhook-timestamp']);
        $this->expectException(WebhookVerificationException::class);
        $this->expectExceptionMessage('the webhook-timestamp header is missing');
        (new Webhook(self::SECRET))->verify(self::BODY, $headers);
    }

    public function testASecretThatIsNotWhsecBase64IsAMistake(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        new Webhook('not-a-secret');
    }

    /**
     * The three headers smtpgate's signer (smtpgate.webhooks.signing) makes.
     *
     * @return array<string, string>
     */
    private static function signed(string $secret, string $id, int $timestamp, string $body): array
    {
        $repository = dirname(__DIR__, 3);
        $env = getenv();
        $env['PYTHONPATH'] = "{$repository}/daemon" . (isset($env['PYTHONPATH']) ? ":{$env['PYTHONPATH']}" : '');
        $python = getenv('SMTPGATE_TEST_PYTHON') ?: 'python3';
        $script = 'import json, sys; from smtpgate.webhooks import signing; '
            . 'print(json.dumps(signing.headers(signing.parse_secrets(sys.argv[1]), sys.argv[2], int(sys.argv[3]), '
            . 'sys.stdin.buffer.read())))';
        $io = [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']];
        $process = proc_open([$python, '-c', $script, $secret, $id, (string) $timestamp], $io, $pipes, null, $env);
        self::assertIsResource($process, "cannot run {$python}");
        fwrite($pipes[0], $body);
        fclose($pipes[0]);
        $out = stream_get_contents($pipes[1]);
        $err = stream_get_contents($pipes[2]);
        fclose($pipes[1]);
        fclose($pipes[2]);
        self::assertSame(0, proc_close($process), "the signer failed: {$err}");
        return json_decode((string) $out, true, 4, JSON_THROW_ON_ERROR);
    }
}
