<?php
/*
 * Hand-off latency of one mail from PHP: run by bench/php_handoff.py, which
 * starts the daemon and the upstream and turns the figures into p50/p99.
 *
 *     php bench/php_handoff.php MODE COUNT TARGET
 *
 * MODE (TARGET):
 *   gate_connect  (daemon URI)   new Client + send() per mail: what one PHP page costs
 *   gate_open     (daemon URI)   send() on one open connection
 *   ping_open     (daemon URI)   ping() on one open connection: the round-trip floor
 *                                of client and daemon, nothing stored
 *   smtp_connect  (host:port)    the classic fsockopen SMTP conversation per mail,
 *                                straight to the upstream: greeting, EHLO, MAIL,
 *                                RCPT, DATA, message and dot in one fwrite; the
 *                                clock stops at the 250 after the dot (QUIT not timed)
 *   smtp_open     (host:port)    the same conversation, one connection, MAIL..DATA per mail
 *   smtp_dot_apart (host:port)   smtp_connect, but the final ".\r\n" in its own fwrite,
 *                                as many hand-written scripts do (Nagle + delayed ACK)
 *
 * Prints one JSON object: {"mode", "count", "latencies_us": [...]} (hrtime).
 * Every mail carries the same ~1 KiB text body and a UTF-8 subject.
 */

declare(strict_types=1);

require __DIR__ . '/../clients/php/autoload.php';

use SmtpGate\Client;

const WARMUP = 20;
const FROM = 'app@example.com';
const TO = 'kelly@example.org';
const SUBJECT = '记得收衣服';
define('BODY', str_repeat("今天我不回家，晚饭自己吃。 0123456789\n", 24)); // ~1 KiB

[$script, $mode, $count, $target] = $argv + [null, null, '1000', ''];
$count = (int) $count;

/** Microseconds since an arbitrary origin (monotonic). */
function now_us(): float
{
    return hrtime(true) / 1000.0;
}

/**
 * Runs $send WARMUP times untimed, then $count times timed; returns the
 * latencies in µs. $after(result of $send) runs after each, off the clock.
 */
function measure(int $count, callable $send, ?callable $after = null): array
{
    $after ??= static function (mixed $unused): void {
    };
    for ($i = 0; $i < WARMUP; $i++) {
        $after($send());
    }
    $latencies = [];
    for ($i = 0; $i < $count; $i++) {
        $start = now_us();
        $result = $send();
        $latencies[] = round(now_us() - $start, 1);
        $after($result);
    }
    return $latencies;
}

function gate_message(): array
{
    return ['from' => FROM, 'to' => TO, 'subject' => SUBJECT, 'text' => BODY];
}

/*
 * The direct SMTP side: what a PHP script without smtpgate does. Written
 * correctly (multi-line replies read to their last line, RFC 5321 4.2.1;
 * dot-stuffing is moot for this body), so the comparison is with a script
 * that works, not with a broken one.
 */

/** Reads one SMTP reply (all its lines); returns its code, throws on EOF/timeout. */
function smtp_reply($socket): int
{
    while (true) {
        $line = fgets($socket, 1024);
        if ($line === false) {
            $meta = stream_get_meta_data($socket);
            throw new RuntimeException($meta['timed_out'] ? 'SMTP reply timed out' : 'SMTP connection closed');
        }
        if (strlen($line) < 4 || $line[3] !== '-') {
            return (int) substr($line, 0, 3);
        }
    }
}

/** Writes $command and checks the reply code. */
function smtp_command($socket, string $command, int $expect): void
{
    if (fwrite($socket, $command) !== strlen($command)) {
        throw new RuntimeException('SMTP write failed');
    }
    $code = smtp_reply($socket);
    if ($code !== $expect) {
        throw new RuntimeException("SMTP: expected {$expect}, got {$code} after " . strtok($command, "\r"));
    }
}

/** @return resource an SMTP session after the greeting and EHLO */
function smtp_open(string $target)
{
    [$host, $port] = explode(':', $target);
    $socket = fsockopen($host, (int) $port, $errno, $errstr, 5.0);
    if ($socket === false) {
        throw new RuntimeException("cannot connect to {$target}: {$errstr}");
    }
    stream_set_timeout($socket, 10);
    if (smtp_reply($socket) !== 220) {
        throw new RuntimeException('no 220 greeting');
    }
    smtp_command($socket, "EHLO bench.example\r\n", 250);
    return $socket;
}

/** MAIL, RCPT, DATA and the message; the dot in the same write unless $dotApart. */
function smtp_transaction($socket, bool $dotApart = false): void
{
    static $data = null;
    $data ??= 'From: ' . FROM . "\r\nTo: " . TO . "\r\nSubject: =?UTF-8?B?" . base64_encode(SUBJECT) . "?=\r\n"
        . "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        . str_replace("\n", "\r\n", BODY);
    smtp_command($socket, 'MAIL FROM:<' . FROM . ">\r\n", 250);
    smtp_command($socket, 'RCPT TO:<' . TO . ">\r\n", 250);
    smtp_command($socket, "DATA\r\n", 354);
    if ($dotApart) {
        fwrite($socket, $data);
        smtp_command($socket, ".\r\n", 250);
    } else {
        smtp_command($socket, $data . ".\r\n", 250);
    }
}

function smtp_quit($socket): void
{
    fwrite($socket, "QUIT\r\n");
    fclose($socket);
}

switch ($mode) {
    case 'gate_connect':
        $latencies = measure($count, static function () use ($target): void {
            $gate = new Client($target);
            $gate->send(gate_message());
            // Leaving scope closes the socket, as the end of a PHP page would.
        });
        break;
    case 'gate_open':
        $gate = new Client($target);
        $latencies = measure($count, static fn () => $gate->send(gate_message()));
        break;
    case 'ping_open':
        $gate = new Client($target);
        $latencies = measure($count, static fn () => $gate->ping());
        break;
    case 'smtp_connect':
    case 'smtp_dot_apart':
        $latencies = measure($count, static function () use ($target, $mode) {
            $socket = smtp_open($target);
            smtp_transaction($socket, $mode === 'smtp_dot_apart');
            return $socket;
        }, 'smtp_quit');
        break;
    case 'smtp_open':
        $socket = smtp_open($target);
        $latencies = measure($count, static fn () => smtp_transaction($socket));
        smtp_quit($socket);
        break;
    default:
        fwrite(STDERR, "usage: php php_handoff.php gate_connect|gate_open|ping_open|smtp_connect|smtp_open|smtp_dot_apart COUNT TARGET\n");
        exit(2);
}

echo json_encode(['mode' => $mode, 'count' => $count, 'latencies_us' => $latencies]), "\n";
