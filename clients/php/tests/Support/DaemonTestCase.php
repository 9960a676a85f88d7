<?php

declare(strict_types=1);

namespace SmtpGate\Tests\Support;

use PHPUnit\Framework\TestCase;

/** A test that starts real daemons (Daemon) and stops them when it ends, passed or not. */
abstract class DaemonTestCase extends TestCase
{
    /** @var list<Daemon> */
    private array $daemons = [];

    /** @param array<string, scalar|list<scalar>> $settings configuration keys */
    protected function startDaemon(array $settings = []): Daemon
    {
        return $this->daemons[] = Daemon::start($settings);
    }

    /** A tcp:// URI where nothing listens (a port bound, then released). */
    protected static function deadTcpUri(): string
    {
        $socket = stream_socket_server('tcp://127.0.0.1:0');
        $address = stream_socket_get_name($socket, false);
        fclose($socket);
        return "tcp://{$address}";
    }

    /** The exception $call throws; fails the test when it throws none. */
    protected static function thrown(callable $call): \Throwable
    {
        try {
            $call();
        } catch (\Throwable $e) {
            return $e;
        }
        self::fail('no exception was thrown');
    }

    protected function tearDown(): void
    {
        foreach ($this->daemons as $daemon) {
            $daemon->stop();
        }
        $this->daemons = [];
    }
}
