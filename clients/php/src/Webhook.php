<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\WebhookVerificationException;

/**
 * Verifies smtpgate's delivery webhooks (docs/webhooks.md), signed per the
 * Standard Webhooks specification: HMAC-SHA256 under the `whsec_` secret over
 * "{webhook-id}.{webhook-timestamp}.{body}", sent as `webhook-signature:
 * v1,<base64>` (a space-separated list while a secret is being rotated).
 *
 *     $hook = new SmtpGate\Webhook(trim(file_get_contents('/etc/shop/smtpgate-webhook.secret')));
 *     try {
 *         $event = $hook->verify(file_get_contents('php://input'), $_SERVER);
 *     } catch (SmtpGate\Exception\WebhookVerificationException $e) {
 *         http_response_code(400);
 *         exit;
 *     }
 *     // $event['type'] === 'message.sent', $event['data']['message_id'], ...
 *     // $hook->verifiedId(): the signed webhook-id, to skip an event already handled
 *
 * Pass the body exactly as received (php://input): a body decoded and encoded
 * again is not the body that was signed. An event may arrive more than once
 * (smtpgate retries until it gets a 2xx): keep the verifiedId() of the events
 * you have handled and skip a repeat (not $_SERVER['HTTP_WEBHOOK_ID'] or
 * another copy of the header: only the one verify() checked is signed).
 */
final class Webhook
{
    /** Seconds a request's timestamp may be away from this clock (the reference libraries' 5 minutes). */
    public const DEFAULT_TOLERANCE = 300;

    private const PREFIX = 'whsec_';

    /** The key's length in bytes, as smtpgate accepts it (the specification: 24 bytes at least). */
    public const MIN_KEY_BYTES = 24;
    public const MAX_KEY_BYTES = 64;

    /**
     * Where each header is looked for: its name in any case (getallheaders(),
     * PSR-7, frameworks), or its $_SERVER key. No other spelling counts.
     */
    private const HEADERS = [
        'webhook-id' => 'id', 'webhook-timestamp' => 'timestamp', 'webhook-signature' => 'signature',
    ];
    private const SERVER_KEYS = [
        'HTTP_WEBHOOK_ID' => 'id', 'HTTP_WEBHOOK_TIMESTAMP' => 'timestamp', 'HTTP_WEBHOOK_SIGNATURE' => 'signature',
    ];

    private string $key;

    private ?string $verifiedId = null;

    /**
     * @param string $secret the webhook secret, `whsec_` and base64 (as in smtpgate's webhook_secret_file)
     * @param int $tolerance seconds a timestamp may differ from now
     * @throws \InvalidArgumentException for a secret that is not `whsec_` and base64 of 24 to 64 bytes
     */
    public function __construct(string $secret, private int $tolerance = self::DEFAULT_TOLERANCE)
    {
        $secret = trim($secret);
        $key = str_starts_with($secret, self::PREFIX)
            ? base64_decode(substr($secret, strlen(self::PREFIX)), true)
            : false;
        if ($key === false || $key === '') {
            throw new \InvalidArgumentException('a webhook secret is whsec_ followed by base64');
        }
        if (strlen($key) < self::MIN_KEY_BYTES || strlen($key) > self::MAX_KEY_BYTES) {
            throw new \InvalidArgumentException(sprintf(
                'a webhook secret holds %d to %d random bytes after whsec_ (base64), this one %d',
                self::MIN_KEY_BYTES,
                self::MAX_KEY_BYTES,
                strlen($key)
            ));
        }
        $this->key = $key;
    }

    /**
     * Checks a request and returns its decoded JSON payload.
     *
     * @param string $body the raw request body
     * @param array<string, mixed> $headers the request's headers by name, in any case
     *     (getallheaders(), a framework's), or $_SERVER (HTTP_WEBHOOK_ID, ...)
     * @param int|null $now the current Unix time (tests); null: time()
     * @return array<string, mixed> the event: type, timestamp, data (its webhook-id: verifiedId())
     * @throws WebhookVerificationException when the request is not a genuine, fresh event, or
     *     carries a webhook-* header twice (say as both Webhook-Id and HTTP_WEBHOOK_ID)
     */
    public function verify(string $body, array $headers, ?int $now = null): array
    {
        $this->verifiedId = null;
        $found = self::webhookHeaders($headers);
        foreach (['id', 'timestamp', 'signature'] as $name) {
            if (!isset($found[$name]) || $found[$name] === '') {
                throw new WebhookVerificationException("the webhook-{$name} header is missing");
            }
        }
        $timestamp = $found['timestamp'];
        if (preg_match('/\A[0-9]{1,12}\z/', $timestamp) !== 1) {
            throw new WebhookVerificationException('the webhook-timestamp header is not a Unix time');
        }
        if (abs(($now ?? time()) - (int) $timestamp) > $this->tolerance) {
            throw new WebhookVerificationException(
                "the webhook-timestamp is more than {$this->tolerance} s away from now (a replay, or a wrong clock)"
            );
        }
        $mac = hash_hmac('sha256', "{$found['id']}.{$timestamp}.{$body}", $this->key, true);
        $expected = 'v1,' . base64_encode($mac);
        $matched = false;
        foreach (explode(' ', $found['signature']) as $signature) {
            $matched = hash_equals($expected, $signature) || $matched;  // each compared in constant time
        }
        if (!$matched) {
            throw new WebhookVerificationException('no signature matches the body (a wrong secret, or a changed body)');
        }
        try {
            $event = json_decode($body, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException $e) {
            throw new WebhookVerificationException('the body is not JSON: ' . $e->getMessage(), 0, $e);
        }
        if (!is_array($event)) {
            throw new WebhookVerificationException('the body is not a JSON object');
        }
        $this->verifiedId = $found['id'];
        return $event;
    }

    /**
     * The webhook-id of the request the last verify() accepted, the one its
     * signature covers: the key to skip an event already handled. Null before
     * any verify() and after one that threw.
     */
    public function verifiedId(): ?string
    {
        return $this->verifiedId;
    }

    /**
     * The webhook-* headers' values by their short name (id, timestamp, signature).
     * A header found under two spellings is refused: which one a caller would
     * read afterwards (say $_SERVER's) is not known, so neither is trusted.
     *
     * @param array<string, mixed> $headers
     * @return array<string, string>
     * @throws WebhookVerificationException for a header given twice
     */
    private static function webhookHeaders(array $headers): array
    {
        $found = [];
        foreach ($headers as $name => $value) {
            $name = (string) $name;
            $short = self::SERVER_KEYS[$name] ?? self::HEADERS[strtolower($name)] ?? null;
            if ($short === null) {
                continue;
            }
            if (isset($found[$short])) {
                throw new WebhookVerificationException("the webhook-{$short} header is given more than once");
            }
            if (is_array($value)) {  // PSR-7's getHeaders(): a list per name
                $value = implode(' ', $value);
            }
            $found[$short] = is_string($value) ? trim($value) : '';
        }
        return $found;
    }
}
