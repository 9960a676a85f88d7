<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\ConnectionException;
use SmtpGate\Exception\ProtocolException;
use SmtpGate\Exception\ServerException;
use SmtpGate\Exception\TimeoutException;

/**
 * A client of the smtpgate daemon (docs/protocol.md): hands a message over in one
 * request and gets its id back once the daemon has stored it durably.
 *
 *     $gate = new Client('unix:///run/smtpgate/smtpgate.sock');
 *     $id = $gate->send(['from' => 'app@example.com', 'to' => 'kelly@example.org',
 *                        'subject' => '记得收衣服', 'text' => '今天我不回家']);
 *
 * The connection is opened on the first request and kept for the next ones.
 * Refusals throw a ServerException subclass per error code, transport
 * failures a ConnectionException (TimeoutException for timeouts).
 *
 * Reconnecting: when the daemon closed a kept connection while it was idle
 * (its idle timeout), the next request notices before writing and reconnects
 * silently: nothing was sent, so this is safe for every request. If the close
 * races with the write and is only seen when reading the reply, the request
 * is repeated once on a new connection only when a repeat cannot do harm:
 * PING, HELLO, STATUS, WAIT, STATS, AUTH, and a SEND that carries an
 * `idempotency_key` (the daemon answers the first id). A plain SEND is not
 * repeated, because the daemon may have stored it before the connection
 * broke; the caller gets a ConnectionException and decides.
 */
final class Client
{
    public const DEFAULT_URI = 'tcp://127.0.0.1:2526';
    public const DEFAULT_PORT = 2526;

    /*
     * sendMany() writes this many requests, then reads their replies. Writing
     * a whole batch before reading can deadlock once the unread replies fill
     * our receive buffer: the daemon's writes block, it stops reading after
     * 1024 queued replies (its MAX_PIPELINE), and then our write blocks too.
     * A window's replies (256 x ~30 bytes, ~8 KiB) always fit in the socket
     * buffers, and one round trip per 256 mails costs next to nothing.
     */
    private const PIPELINE_WINDOW = 256;

    /** Seconds a WAIT without seconds may block in the daemon: its default (docs/protocol.md leaves it to the daemon). */
    private const DAEMON_WAIT_DEFAULT = 30.0;

    private const OPTION_DEFAULTS = [
        'connect_timeout' => 3.0, // seconds per endpoint tried
        'read_timeout' => 10.0,   // seconds for one reply (a WAIT adds its own seconds)
        'token' => null,          // sent as AUTH on every new connection
    ];

    /** @var list<string> endpoints in the order they are tried */
    private readonly array $endpoints;
    private readonly float $connectTimeout;
    private readonly float $readTimeout;
    private ?string $token;
    private ?Connection $connection = null;
    /** True while the AUTH for a new connection still has to go out (it is pipelined with the first request). */
    private bool $authPending = false;
    /** The endpoint of the latest connection, kept for error messages after it closed. */
    private string $lastEndpoint = '';
    /** Set by exchange(): whether its last failed attempt had written nothing at all. */
    private bool $nothingSentInLastExchange = false;

    /**
     * @param string|list<string> $uri     `tcp://host:port` or `unix:///path`, or a list of them
     *                                     tried in order (failover across daemons)
     * @param array{connect_timeout?: float, read_timeout?: float, token?: ?string} $options
     *
     * Connects lazily: nothing is opened before the first request.
     */
    public function __construct(string|array $uri = self::DEFAULT_URI, array $options = [])
    {
        $uris = is_array($uri) ? array_values($uri) : [$uri];
        if ($uris === []) {
            throw new \InvalidArgumentException('at least one daemon URI is needed');
        }
        $this->endpoints = array_map([self::class, 'normaliseUri'], $uris);
        $unknown = array_diff_key($options, self::OPTION_DEFAULTS);
        if ($unknown !== []) {
            throw new \InvalidArgumentException('unknown option(s): ' . implode(', ', array_keys($unknown)));
        }
        $options += self::OPTION_DEFAULTS;
        $this->connectTimeout = self::positive('connect_timeout', $options['connect_timeout']);
        $this->readTimeout = self::positive('read_timeout', $options['read_timeout']);
        $this->token = $options['token'] === null ? null : (string) $options['token'];
    }

    /**
     * Authenticates with $token now and on every later reconnect. Throws
     * AuthFailedException for a wrong token.
     */
    public function auth(string $token): void
    {
        $this->token = $token;
        // An exchange of no requests sends just the pending AUTH; connect()
        // sets it pending again if the exchange has to reconnect.
        $this->authPending = true;
        $this->exchange([], true);
    }

    /**
     * Hands $message over (fields of docs/protocol.md "SEND": from, to, cc, bcc,
     * reply_to, subject, text, html, attachments, headers, raw,
     * idempotency_key) and returns its id once the daemon has stored it.
     * See Attachment for the attachment entries.
     */
    public function send(array $message): string
    {
        $line = Protocol::requestLine('SEND', Protocol::encodeMessage($message));
        return $this->request($line, isset($message['idempotency_key']), 0.0, Protocol::parseId(...));
    }

    /**
     * Hands over a complete RFC 5322 message as is; $from and $to are the
     * envelope. $fields may add cc, bcc and idempotency_key. The message must
     * be UTF-8 or 7-bit (8-bit legacy charsets cannot travel in JSON: use a
     * base64 or quoted-printable body for them).
     */
    public function sendRaw(string $rawMessage, string $from, string|array $to, array $fields = []): string
    {
        return $this->send(['raw' => $rawMessage, 'from' => $from, 'to' => $to] + $fields);
    }

    /**
     * Hands over many messages on one connection, pipelined: requests are
     * written in windows of many at once and the replies read in order, so a
     * batch costs about one round trip per window instead of one per message.
     * Returns a BatchResult keyed like $messages. Throws ConnectionException
     * only when nothing at all could be sent (daemon down), and the refusal
     * of the token (AuthFailedException); once requests are out, a broken
     * connection is reported per message in the result.
     */
    public function sendMany(array $messages): BatchResult
    {
        $lines = [];
        foreach ($messages as $key => $message) {
            $lines[$key] = Protocol::requestLine('SEND', Protocol::encodeMessage($message));
        }
        $ids = [];
        $errors = [];
        $broken = null;
        foreach (array_chunk($lines, self::PIPELINE_WINDOW, true) as $window) {
            $keys = array_keys($window);
            $replies = [];
            if ($broken === null) {
                try {
                    $this->exchange(array_values($window), false, 0.0, $replies);
                } catch (ConnectionException | ProtocolException $e) {
                    if ($ids === [] && $errors === [] && $replies === [] && $this->nothingSentInLastExchange) {
                        throw $e;
                    }
                    $broken = $e;
                }
            }
            foreach ($keys as $i => $key) {
                if ($broken !== null && !array_key_exists($i, $replies)) {
                    $errors[$key] = $broken;
                    continue;
                }
                try {
                    $payload = Protocol::parseReply($replies[$i], $this->lastEndpoint);
                    $ids[$key] = Protocol::parseId($payload, $this->lastEndpoint);
                } catch (ServerException $e) {
                    $errors[$key] = $e;
                } catch (ProtocolException $e) {
                    // Out of step from here on: no later reply can be trusted.
                    $this->dropConnection();
                    $errors[$key] = $broken = $e;
                    $replies = array_slice($replies, 0, $i + 1);
                }
            }
        }
        return new BatchResult($ids, $errors);
    }

    /**
     * The state of message $id now (docs/protocol.md "Message state": id, state,
     * attempts, recipients, ...). Throws NotFoundException for an unknown id.
     */
    public function status(string $id): array
    {
        $line = Protocol::requestLine('STATUS', Protocol::checkId($id));
        return $this->request($line, true, 0.0, Protocol::decodeObject(...));
    }

    /**
     * The state of message $id once it is final (sent or failed) or after
     * $seconds (the daemon's default when null), whichever comes first.
     */
    public function wait(string $id, int|float|null $seconds = null): array
    {
        $argument = Protocol::checkId($id) . ($seconds === null ? '' : ' ' . Protocol::formatSeconds($seconds));
        $extraTimeout = $seconds === null ? self::DAEMON_WAIT_DEFAULT : (float) $seconds;
        $line = Protocol::requestLine('WAIT', $argument);
        return $this->request($line, true, $extraTimeout, Protocol::decodeObject(...));
    }

    /** True when the daemon answers PING with PONG; throws otherwise. */
    public function ping(): bool
    {
        $isPong = static function (string $payload, string $endpoint): bool {
            if ($payload !== 'PONG') {
                throw new ProtocolException("PING answered with \"{$payload}\" [{$endpoint}]");
            }
            return true;
        };
        return $this->request(Protocol::requestLine('PING'), true, 0.0, $isPong);
    }

    /** The daemon's counters (docs/protocol.md: STATS). */
    public function stats(): array
    {
        return $this->request(Protocol::requestLine('STATS'), true, 0.0, Protocol::decodeObject(...));
    }

    /** The daemon's `smtpgate <protocol version> <software version>` greeting (HELLO). */
    public function hello(): string
    {
        return $this->request(Protocol::requestLine('HELLO', '1'), true);
    }

    /** Says QUIT and closes the connection; the next request opens a new one. */
    public function close(): void
    {
        if ($this->connection !== null && $this->connection->isOpen() && !$this->connection->hasUnexpectedInput()) {
            try {
                $this->connection->write(Protocol::requestLine('QUIT'), $this->readTimeout);
            } catch (ConnectionException) {
                // Closing anyway: a daemon that went away needs no goodbye.
            }
        }
        $this->dropConnection();
    }

    /** The endpoint of the open connection, or '' when not connected. */
    public function endpoint(): string
    {
        return $this->connection?->endpoint ?? '';
    }

    public function __destruct()
    {
        $this->dropConnection();
    }

    /**
     * One request line, one reply: returns the OK payload, passed through
     * $decode(payload, endpoint) when given, or throws the reply's exception.
     * A ProtocolException drops the connection: later replies could be out of step.
     */
    private function request(string $line, bool $repeatable, float $extraTimeout = 0.0, ?callable $decode = null): mixed
    {
        $replies = [];
        $this->exchange([$line], $repeatable, $extraTimeout, $replies);
        try {
            $payload = Protocol::parseReply($replies[0], $this->lastEndpoint);
            return $decode === null ? $payload : $decode($payload, $this->lastEndpoint);
        } catch (ProtocolException $e) {
            $this->dropConnection();
            throw $e;
        }
    }

    /**
     * Writes $lines in one write and appends their reply lines to $replies,
     * in order, as they arrive (so a caller keeps the replies read before a
     * failure). Connects first if needed, with a pipelined AUTH when a token
     * is set. Reconnects once as described on the class.
     *
     * @param list<string> $lines
     * @param list<string> $replies
     */
    private function exchange(array $lines, bool $repeatable, float $extraTimeout = 0.0, array &$replies = []): void
    {
        for ($attempt = 1;; $attempt++) {
            $this->nothingSentInLastExchange = true;
            $reused = $this->connection !== null;
            if ($reused && $this->connection->hasUnexpectedInput()) {
                $this->dropConnection(); // closed while idle: nothing sent yet, always safe
                $reused = false;
            }
            $connection = $this->connection ?? $this->connect();
            $sentBefore = $connection->bytesSent();
            $withAuth = $this->authPending;
            $batch = $withAuth ? [Protocol::requestLine('AUTH', (string) $this->token), ...$lines] : $lines;
            try {
                $connection->write(implode('', $batch), $this->readTimeout);
                $this->nothingSentInLastExchange = false;
                $this->authPending = false;
                if ($withAuth) {
                    $this->checkAuthReply($connection->readLine($this->readTimeout));
                }
                foreach ($lines as $_) {
                    $replies[] = $connection->readLine($this->readTimeout + $extraTimeout);
                }
                return;
            } catch (ConnectionException $e) {
                $this->dropConnection();
                $this->nothingSentInLastExchange = $connection->bytesSent() === $sentBefore;
                $safe = $this->nothingSentInLastExchange || ($repeatable && $replies === []);
                if ($attempt > 1 || !$reused || !$safe || $e instanceof TimeoutException) {
                    throw $e;
                }
            } catch (ProtocolException $e) {
                $this->dropConnection();
                throw $e;
            }
        }
    }

    /** Throws the refusal of a pipelined AUTH (after closing: the replies behind it are moot). */
    private function checkAuthReply(string $line): void
    {
        try {
            Protocol::parseReply($line, $this->lastEndpoint);
        } catch (ServerException $e) {
            $this->dropConnection();
            throw $e;
        }
    }

    /**
     * Opens a connection to the first endpoint that answers, in list order.
     * Throws ConnectionException naming every endpoint tried and why it failed.
     */
    private function connect(): Connection
    {
        $failures = [];
        foreach ($this->endpoints as $endpoint) {
            try {
                $this->connection = Connection::open($endpoint, $this->connectTimeout);
                $this->lastEndpoint = $endpoint;
                $this->authPending = $this->token !== null;
                return $this->connection;
            } catch (ConnectionException $e) {
                $failures[] = $e;
            }
        }
        if (count($failures) === 1) {
            throw $failures[0]; // keeps TimeoutException distinct for a single daemon
        }
        $reasons = array_map(static fn (ConnectionException $e): string => $e->getMessage(), $failures);
        throw new ConnectionException('no smtpgate daemon reachable: ' . implode('; ', $reasons));
    }

    private function dropConnection(): void
    {
        $this->connection?->close();
        $this->connection = null;
    }

    /** `tcp://host[:port]` or `unix:///path`, with the default port filled in. */
    private static function normaliseUri(mixed $uri): string
    {
        if (!is_string($uri)) {
            throw new \InvalidArgumentException('a daemon URI is a string');
        }
        if (preg_match('~^unix://(/.+)$~', $uri) === 1) {
            return $uri;
        }
        if (preg_match('~^tcp://(\[[0-9a-fA-F:.]+\]|[^:/\[\]]+)(?::(\d{1,5}))?/?$~', $uri, $m) === 1) {
            return 'tcp://' . $m[1] . ':' . ($m[2] ?? self::DEFAULT_PORT);
        }
        throw new \InvalidArgumentException("not a daemon URI (tcp://host:port or unix:///path): {$uri}");
    }

    private static function positive(string $name, mixed $value): float
    {
        if (!is_int($value) && !is_float($value) || $value <= 0) {
            throw new \InvalidArgumentException("{$name} must be a number of seconds > 0");
        }
        return (float) $value;
    }
}
