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
 *
 * Pass the body exactly as received (php://input): a body decoded and encoded
 * again is not the body that was signed. An event may arrive more than once
 * (smtpgate retries until it gets a 2xx): keep the `webhook-id` header of the
 * events you have handled and skip a repeat.
 */
final class Webhook
{
    /** Seconds a request's timestamp may be away from this clock (the reference libraries' 5 minutes). */
    public const DEFAULT_TOLERANCE = 300;

    private const PREFIX = 'whsec_';

    private string $key;

    /**
     * @param string $secret the webhook secret, `whsec_` and base64 (as in smtpgate's webhook_secret_file)
     * @param int $tolerance seconds a timestamp may differ from now
     * @throws \InvalidArgumentException for a secret that is not `whsec_` and base64
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
        $this->key = $key;
    }

    /**
     * Checks a request and returns its decoded JSON payload.
     *
     * @param string $body the raw request body
     * @param array<string, mixed> $headers the request's headers by name, in any case
     *     (getallheaders(), a framework's), or $_SERVER (HTTP_WEBHOOK_ID, ...)
     * @param int|null $now the current Unix time (tests); null: time()
     * @return array<string, mixed> the event: type, timestamp, data
     * @throws WebhookVerificationException when the request is not a genuine, fresh event
     */
    public function verify(string $body, array $headers, ?int $now = null): array
    {
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
        return $event;
    }

    /**
     * The webhook-* headers' values by their short name (id, timestamp, signature).
     *
     * @param array<string, mixed> $headers
     * @return array<string, string>
     */
    private static function webhookHeaders(array $headers): array
    {
        $found = [];
        foreach ($headers as $name => $value) {
            $name = strtolower(str_replace('_', '-', (string) $name));
            if (str_starts_with($name, 'http-')) {
                $name = substr($name, 5);  // $_SERVER's HTTP_WEBHOOK_ID
            }
            if (is_array($value)) {  // PSR-7's getHeaders(): a list per name
                $value = implode(' ', $value);
            }
            if (str_starts_with($name, 'webhook-') && is_string($value)) {
                $found[substr($name, 8)] = trim($value);
            }
        }
        return $found;
    }
}
