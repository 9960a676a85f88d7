<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\ConnectionException;
use SmtpGate\Exception\ProtocolException;
use SmtpGate\Exception\TimeoutException;

/**
 * One socket to one daemon: the thin I/O layer under Client (the predis
 * Stream shape). Every failure closes the socket before it is thrown, and
 * every exception names the endpoint.
 */
final class Connection
{
    /** Bytes asked of one fread: a reply is usually under 100 bytes, a STATUS a few KiB. */
    private const READ_CHUNK = 65536;

    /** @var resource|null */
    private $stream;
    private readonly ReplyReader $reader;
    /** Total bytes the kernel accepted from us; lets Client tell "nothing of the request went out". */
    private int $bytesSent = 0;

    /** @param resource $stream */
    private function __construct($stream, public readonly string $endpoint)
    {
        $this->stream = $stream;
        $this->reader = new ReplyReader();
    }

    /**
     * Connects to `tcp://host:port` or `unix:///path` within $timeout
     * seconds. Throws TimeoutException or ConnectionException.
     */
    public static function open(string $endpoint, float $timeout): self
    {
        // TCP_NODELAY: requests are whole writes, so Nagle only hurts: the
        // last small segment of a large SEND or of a pipelined window would
        // wait for the daemon's delayed ACK (up to 40 ms on Linux).
        $options = str_starts_with($endpoint, 'tcp://') ? ['socket' => ['tcp_nodelay' => true]] : [];
        $errno = 0;
        $errstr = '';
        $context = stream_context_create($options);
        $connect = static function () use ($endpoint, $timeout, $context, &$errno, &$errstr) {
            return stream_socket_client($endpoint, $errno, $errstr, $timeout, STREAM_CLIENT_CONNECT, $context);
        };
        [$stream, $warning] = self::capture($connect);
        if ($stream === false) {
            $why = $errstr !== '' ? $errstr : ($warning ?? 'unknown error');
            // 110 ETIMEDOUT; PHP also reports its own connect timeout that way.
            $timedOut = $errno === 110 || stripos($why, 'timed out') !== false;
            $class = $timedOut ? TimeoutException::class : ConnectionException::class;
            throw new $class("cannot connect to {$endpoint}: {$why}");
        }
        stream_set_blocking($stream, true);
        return new self($stream, $endpoint);
    }

    public function isOpen(): bool
    {
        return $this->stream !== null;
    }

    public function bytesSent(): int
    {
        return $this->bytesSent;
    }

    /**
     * Writes all of $bytes, looping on partial writes (one request, or one
     * pipelined window, is one buffer: never written piecemeal). Throws
     * TimeoutException / ConnectionException after closing.
     */
    public function write(string $bytes, float $timeout): void
    {
        $stream = $this->requireStream();
        stream_set_timeout($stream, ...self::splitSeconds($timeout));
        $length = strlen($bytes);
        $offset = 0;
        while ($offset < $length) {
            $chunk = $offset === 0 ? $bytes : substr($bytes, $offset);
            [$written, $warning] = self::capture(static fn () => fwrite($stream, $chunk));
            if ($written === false || $written === 0) {
                $timedOut = stream_get_meta_data($stream)['timed_out'];
                if ($timedOut) {
                    $this->fail(TimeoutException::class, "write timed out after {$timeout} s");
                }
                $this->fail(ConnectionException::class, 'write failed: ' . ($warning ?? 'connection closed'));
            }
            $offset += $written;
            $this->bytesSent += $written;
        }
    }

    /**
     * The next reply line without CRLF, waiting at most $timeout seconds in
     * all. Throws TimeoutException, ConnectionException (closed by the
     * daemon) or ProtocolException (malformed), each after closing.
     */
    public function readLine(float $timeout): string
    {
        $deadline = microtime(true) + $timeout;
        while (true) {
            try {
                $line = $this->reader->nextLine();
            } catch (ProtocolException $e) {
                $this->fail(ProtocolException::class, $e->getMessage());
            }
            if ($line !== null) {
                return $line;
            }
            $stream = $this->requireStream();
            $left = $deadline - microtime(true);
            if ($left <= 0) {
                $this->fail(TimeoutException::class, "no reply within {$timeout} s");
            }
            stream_set_timeout($stream, ...self::splitSeconds($left));
            [$bytes, $warning] = self::capture(static fn () => fread($stream, self::READ_CHUNK));
            if ($bytes === false || $bytes === '') {
                if (stream_get_meta_data($stream)['timed_out']) {
                    $this->fail(TimeoutException::class, "no reply within {$timeout} s");
                }
                if ($bytes === false || feof($stream)) {
                    $this->fail(ConnectionException::class, 'connection closed by the daemon'
                        . ($warning !== null ? ": {$warning}" : '')
                        . ($this->reader->pendingBytes() > 0 ? ' in the middle of a reply' : ''));
                }
                continue; // an interrupted read: nothing lost, try again
            }
            $this->reader->feed($bytes);
        }
    }

    /**
     * True when there is something to read although no request is waiting
     * for a reply: the daemon closed an idle connection (EOF), or sent a
     * farewell line before closing. Either way the connection is not usable.
     */
    public function hasUnexpectedInput(): bool
    {
        if ($this->stream === null) {
            return true;
        }
        if ($this->reader->pendingBytes() > 0) {
            return true;
        }
        $read = [$this->stream];
        $write = $except = null;
        [$ready] = self::capture(static fn () => stream_select($read, $write, $except, 0));
        return $ready !== 0; // 1: readable; false: select failed on a broken socket
    }

    public function close(): void
    {
        if ($this->stream !== null) {
            fclose($this->stream);
            $this->stream = null;
        }
    }

    public function __destruct()
    {
        $this->close();
    }

    /** @return resource */
    private function requireStream()
    {
        if ($this->stream === null) {
            throw new ConnectionException("connection to {$this->endpoint} is closed");
        }
        return $this->stream;
    }

    /** Closes the socket, then throws $class with the endpoint in the message. */
    private function fail(string $class, string $why): never
    {
        $this->close();
        throw new $class("{$why} [{$this->endpoint}]");
    }

    /**
     * Runs $call and returns [its result, the text of a PHP warning it raised
     * or null]. The stream functions report the cause of a failure (ECONNRESET,
     * EPIPE) only as a warning; this keeps that text for the exception instead
     * of printing it or silencing it with @.
     *
     * @return array{0: mixed, 1: ?string}
     */
    private static function capture(callable $call): array
    {
        $warning = null;
        set_error_handler(static function (int $type, string $message) use (&$warning): bool {
            $warning = preg_replace('/^[a-z_]+\(\): /', '', $message);
            return true;
        });
        try {
            return [$call(), $warning];
        } finally {
            restore_error_handler();
        }
    }

    /** @return array{0: int, 1: int} seconds and microseconds for stream_set_timeout */
    private static function splitSeconds(float $seconds): array
    {
        $whole = (int) floor($seconds);
        return [$whole, (int) round(($seconds - $whole) * 1_000_000)];
    }
}
