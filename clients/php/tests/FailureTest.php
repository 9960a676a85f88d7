<?php

declare(strict_types=1);

namespace SmtpGate\Tests;

use SmtpGate\Client;
use SmtpGate\Exception\AuthFailedException;
use SmtpGate\Exception\AuthRequiredException;
use SmtpGate\Exception\BadAddressException;
use SmtpGate\Exception\BadHeaderException;
use SmtpGate\Exception\BadRequestException;
use SmtpGate\Exception\BusyException;
use SmtpGate\Exception\ConnectionException;
use SmtpGate\Exception\DeniedException;
use SmtpGate\Exception\NotFoundException;
use SmtpGate\Exception\ServerException;
use SmtpGate\Exception\TimeoutException;
use SmtpGate\Exception\TooLargeException;
use SmtpGate\Tests\Support\DaemonTestCase;

/**
 * What a script sees when things go wrong, against real daemons: refusals
 * arrive as one exception class per code and leave the connection usable;
 * unreachable and stuck daemons are ConnectionException / TimeoutException
 * naming the address, and failover moves on; a connection the daemon closed
 * while idle is reopened; tokens are required and never shown.
 */
final class FailureTest extends DaemonTestCase
{
    private const OK = ['from' => 'app@example.com', 'to' => 'kelly@example.org'];

    public function testADaemonThatIsDownIsAConnectionExceptionNamingEveryAddressTried(): void
    {
        $tcp = self::deadTcpUri();
        $unix = 'unix://' . sys_get_temp_dir() . '/smtpgate-phpunit-no-daemon-' . bin2hex(random_bytes(6)) . '.sock';

        $failures = [
            self::thrown(fn () => (new Client($tcp))->send(self::OK)),
            self::thrown(fn () => (new Client($unix))->ping()),
            self::thrown(fn () => (new Client([$tcp, $unix]))->ping()),
            self::thrown(fn () => (new Client($tcp))->sendMany([self::OK])),
        ];

        foreach ($failures as $e) {
            $this->assertInstanceOf(ConnectionException::class, $e);
        }
        $this->assertStringContainsString($tcp, $failures[2]->getMessage());
        $this->assertStringContainsString($unix, $failures[2]->getMessage());
    }

    public function testConnectTimeoutThenFailoverToTheNextDaemon(): void
    {
        $daemon = $this->startDaemon();
        [$stuck, $holders] = self::stuckListener();
        $options = ['connect_timeout' => 0.3];
        $failover = new Client([$stuck, $daemon->uri], $options);

        $timeout = self::thrown(fn () => (new Client($stuck, $options))->ping());

        $this->assertInstanceOf(TimeoutException::class, $timeout);
        $this->assertStringContainsString($stuck, $timeout->getMessage());
        $this->assertTrue($failover->ping());
        $this->assertSame($daemon->uri, $failover->endpoint());
        array_map('fclose', $holders);
    }

    public function testEveryRefusalArrivesAsItsClassAndTheConnectionStaysUsable(): void
    {
        $daemon = $this->startDaemon(['max_message_size' => 200000, 'allowed_recipients' => ['@example.org']]);
        $gate = new Client($daemon->uri);
        $send = fn (array $fields) => fn () => $gate->send($fields + self::OK);
        $refusals = [
            'BAD_REQUEST' => [BadRequestException::class, $send(['to' => 42])],
            'BAD_ADDRESS' => [BadAddressException::class, $send(['to' => 'kelly@@example.org'])],
            'BAD_HEADER' => [BadHeaderException::class, $send(['headers' => ['X-Order' => "1\r\nBcc: v@example.org"]])],
            'TOO_LARGE' => [TooLargeException::class, $send(['text' => str_repeat('大', 120000)])],
            'DENIED' => [DeniedException::class, $send(['to' => 'someone@elsewhere.test'])],
            'NOT_FOUND' => [NotFoundException::class, fn () => $gate->status('01NOSUCHMESSAGE000000000')],
        ];

        foreach ($refusals as $code => [$class, $call]) {
            $e = self::thrown($call);
            $this->assertInstanceOf($class, $e, $code);
            $this->assertSame($code, $e->getErrorCode());
            $this->assertFalse($e->isRetryable(), $code);
        }
        $this->assertTrue($gate->ping());
        $this->assertSame(1, $gate->stats()['intake']['connections'], 'a refusal must not cost the connection');
    }

    public function testABusyDaemonRefusesWithARetryableBusyException(): void
    {
        $daemon = $this->startDaemon(['min_free_space' => 10 ** 18]); // "disk low": every SEND is refused

        $e = self::thrown(fn () => (new Client($daemon->uri))->send(self::OK));

        $this->assertInstanceOf(BusyException::class, $e);
        $this->assertInstanceOf(ServerException::class, $e);
        $this->assertSame('BUSY', $e->getErrorCode());
        $this->assertTrue($e->isRetryable());
    }

    public function testAConnectionTheDaemonClosedWhileIdleIsReopenedBeforeWriting(): void
    {
        $daemon = $this->startDaemon(['idle_timeout' => 0.3]);
        $gate = new Client($daemon->uri);
        $this->assertTrue($gate->ping());
        // Wait (bounded) until the daemon has closed $gate's connection: a
        // probe that keeps its own connection busy sees it go.
        $probe = new Client($daemon->uri);
        $deadline = microtime(true) + 10;
        while ($probe->stats()['intake']['open_connections'] > 1 && microtime(true) < $deadline) {
            usleep(20000);
        }
        $open = $probe->stats()['intake']['open_connections'];
        $this->assertSame(1, $open, 'the daemon did not close the idle connection');

        // A SEND without an idempotency key is never repeated once written, so
        // it only succeeds if the client saw the close before writing.
        $id = $gate->send(['subject' => '空闲后'] + self::OK);

        $this->assertSame('sent', $gate->wait($id, 15)['state']);
        $this->assertSame(3, $gate->stats()['intake']['connections'], "\$gate's two and the probe's");
        $this->assertSame('空闲后', $daemon->received(1)[0]->header('Subject'));
    }

    public function testATokenDaemonRequiresAuthAndNeverShowsTheToken(): void
    {
        $daemon = $this->startDaemon(['tokens' => ['php-client-token']]);
        $wrong = 'not-the-token-8d1f';

        $none = self::thrown(fn () => (new Client($daemon->uri))->send(self::OK));
        $wrongOption = self::thrown(fn () => (new Client($daemon->uri, ['token' => $wrong]))->ping());
        $wrongAuth = self::thrown(fn () => (new Client($daemon->uri))->auth($wrong));

        $this->assertInstanceOf(AuthRequiredException::class, $none);
        $this->assertInstanceOf(AuthFailedException::class, $wrongOption);
        $this->assertInstanceOf(AuthFailedException::class, $wrongAuth);
        $this->assertStringNotContainsString($wrong, $wrongOption->getMessage() . $wrongAuth->getMessage());
        $this->assertIsString((new Client($daemon->uri, ['token' => 'php-client-token']))->stats()['version']);
        $unix = new Client($daemon->unixUri);
        $unix->auth('php-client-token');
        $this->assertTrue($unix->ping());
    }

    /**
     * A listener whose accept queue is full, so the kernel drops further SYNs
     * and a connect there hangs until the client's own connect timeout.
     *
     * @return array{0: string, 1: list<resource>} its tcp:// URI, and the
     *   sockets that must stay open while it is used
     */
    private static function stuckListener(): array
    {
        $context = stream_context_create(['socket' => ['backlog' => 0]]);
        $flags = STREAM_SERVER_BIND | STREAM_SERVER_LISTEN;
        $listener = stream_socket_server('tcp://127.0.0.1:0', $errno, $errstr, $flags, $context);
        $uri = 'tcp://' . stream_socket_get_name($listener, false);
        $holders = [$listener];
        for ($i = 0; $i < 3; $i++) {
            $flags = STREAM_CLIENT_CONNECT | STREAM_CLIENT_ASYNC_CONNECT;
            $holders[] = stream_socket_client($uri, $errno, $errstr, 1, $flags);
        }
        return [$uri, $holders];
    }
}
