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

    public function testVerifiedIdIsTheSignedIdOfTheLastAcceptedRequest(): void
    {
        $now = time();
        $headers = self::signed(self::SECRET, 'evt_signed', $now, self::BODY);
        $hook = new Webhook(self::SECRET);
        self::assertNull($hook->verifiedId());
        $server = ['HTTP_WEBHOOK_ID' => $headers['webhook-id'],
                   'HTTP_WEBHOOK_TIMESTAMP' => $headers['webhook-timestamp'],
                   'HTTP_WEBHOOK_SIGNATURE' => $headers['webhook-signature']];
        $hook->verify(self::BODY, $server);
        self::assertSame('evt_signed', $hook->verifiedId());
        try {
            $hook->verify(self::BODY . ' ', $server);
            self::fail('a changed body verified');
        } catch (WebhookVerificationException) {
            self::assertNull($hook->verifiedId(), 'a refused request leaves no id behind');
        }
    }

    /**
     * A request signed for evt_A, replayed with a second webhook-id (evt_B) beside the signed one:
     * the receiver's duplicate check must never look at an id other than the one verified.
     */
    public function testAWebhookHeaderUnderASecondSpellingIsRefused(): void
    {
        $now = time();
        $signed = self::signed(self::SECRET, 'evt_A', $now, self::BODY);
        $rest = ['Webhook-Timestamp' => $signed['webhook-timestamp'],
                 'Webhook-Signature' => $signed['webhook-signature']];
        $hook = new Webhook(self::SECRET);
        $replays = [
            'Http-Webhook-Id is not a spelling of webhook-id' => [
                ['Webhook-Id' => 'evt_B', 'Http-Webhook-Id' => 'evt_A'] + $rest,
                'no signature matches',
            ],
            'a $_SERVER key beside a header name' => [
                ['Webhook-Id' => 'evt_B', 'HTTP_WEBHOOK_ID' => 'evt_A'] + $rest,
                'the webhook-id header is given more than once',
            ],
            'two cases of one name' => [
                ['webhook-id' => 'evt_A', 'Webhook-Id' => 'evt_A'] + $rest,
                'the webhook-id header is given more than once',
            ],
            'the signature twice' => [
                ['Webhook-Id' => 'evt_A', 'HTTP_WEBHOOK_SIGNATURE' => 'v1,AAAA'] + $rest,
                'the webhook-signature header is given more than once',
            ],
        ];
        foreach ($replays as $what => [$headers, $why]) {
            try {
                $hook->verify(self::BODY, $headers);
                self::fail("{$what}: verified as {$hook->verifiedId()}");
            } catch (WebhookVerificationException $e) {
                self::assertStringContainsString($why, $e->getMessage(), $what);
                self::assertNull($hook->verifiedId(), $what);
            }
        }
        // Only the exact spellings count: the request as sent verifies, under its own id.
        self::assertSame('message.sent', $hook->verify(self::BODY, ['Webhook-Id' => 'evt_A'] + $rest)['type']);
        self::assertSame('evt_A', $hook->verifiedId());
    }

    public function testAKeyOf24To64BytesIsRequiredAsSmtpgateDoes(): void
    {
        foreach ([24, 64] as $length) {
            $hook = new Webhook('whsec_' . base64_encode(str_repeat('k', $length)));
            self::assertInstanceOf(Webhook::class, $hook);
        }
        foreach ([1, 23, 65] as $length) {
            try {
                new Webhook('whsec_' . base64_encode(str_repeat('k', $length)));
                self::fail("a key of {$length} bytes was taken");
            } catch (\InvalidArgumentException $e) {
                self::assertStringContainsString('24 to 64 random bytes', $e->getMessage());
                self::assertStringEndsWith("this one {$length}", $e->getMessage());
            }
        }
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
