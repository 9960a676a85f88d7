<?php

declare(strict_types=1);

namespace SmtpGate\Tests\Support;

/**
 * A real smtpgate daemon for one test: `python3 -m smtpgate serve` in a
 * temporary folder, on a free loopback port and a Unix socket, relaying
 * (`dev = true`) to its embedded aiosmtpd server, which writes every message
 * it accepts as an .eml file; received() reads them back.
 *
 * The Python that runs it is $SMTPGATE_TEST_PYTHON, else `python3`; the
 * daemon is this repository's (its daemon/ folder comes first on PYTHONPATH),
 * so the Python needs only the daemon's dependencies (aiosmtpd, structlog).
 */
final class Daemon
{
    /** Seconds a daemon may take to start, and to stop after SIGTERM. */
    private const START_TIMEOUT = 20.0;
    private const STOP_TIMEOUT = 30.0;

    /** Retries in seconds, not minutes, like the pytest fixtures' FAST_RETRIES. */
    private const DEFAULTS = ['helo_name' => 'smtpgate.test',
                              'retry_base' => 0.2, 'retry_max' => 1.0, 'max_age' => 60.0];

    /** Signal numbers (Linux), without requiring ext-pcntl for its constants. */
    private const SIGKILL = 9;
    private const SIGTERM = 15;

    /** @var resource */
    private $process;
    public readonly string $uri;
    public readonly string $unixUri;

    /** @param string $folder the daemon's own temporary folder, removed by stop() */
    private function __construct(public readonly string $folder)
    {
    }

    /**
     * Starts a daemon with these configuration keys on top of the test
     * defaults (docs/configuration.md); returns once it serves. Throws
     * \RuntimeException with the daemon's log when it does not start.
     *
     * @param array<string, scalar|list<scalar>> $settings
     */
    public static function start(array $settings = []): self
    {
        $folder = sys_get_temp_dir() . '/smtpgate-phpunit-' . bin2hex(random_bytes(6));
        mkdir($folder, 0700);
        $daemon = new self($folder);
        $config = ['listen' => ['127.0.0.1:0'], 'socket' => "{$folder}/smtpgate.sock", 'spool' => "{$folder}/spool",
                   'dev' => true, 'dev_maildir' => "{$folder}/mail"] + $settings + self::DEFAULTS;
        file_put_contents("{$folder}/smtpgate.toml", self::toml($config));
        $daemon->launch();
        return $daemon;
    }

    /**
     * The messages the embedded upstream received, oldest first, once there
     * are at least $count of them (bounded by $timeout seconds).
     *
     * @return list<Mail>
     */
    public function received(int $count, float $timeout = 20.0): array
    {
        $deadline = microtime(true) + $timeout;
        do {
            $files = glob("{$this->folder}/mail/*.eml") ?: [];
            if (count($files) >= $count) {
                break;
            }
            usleep(20000);
        } while (microtime(true) < $deadline);
        sort($files);
        return array_map(Mail::fromFile(...), $files);
    }

    /** The daemon's log so far (JSON lines), for failure messages. */
    public function log(): string
    {
        $path = "{$this->folder}/daemon.log";
        return is_file($path) ? (string) file_get_contents($path) : '';
    }

    /** SIGTERM, a bounded wait, SIGKILL if need be; then the folder is removed. */
    public function stop(): void
    {
        if (is_resource($this->process)) {
            proc_terminate($this->process, self::SIGTERM);
            $deadline = microtime(true) + self::STOP_TIMEOUT;
            while (proc_get_status($this->process)['running'] && microtime(true) < $deadline) {
                usleep(20000);
            }
            if (proc_get_status($this->process)['running']) {
                proc_terminate($this->process, self::SIGKILL);
            }
            proc_close($this->process);
        }
        self::remove($this->folder);
    }

    private function launch(): void
    {
        $repository = dirname(__DIR__, 4);
        $env = getenv();
        $env['PYTHONPATH'] = "{$repository}/daemon" . (isset($env['PYTHONPATH']) ? ":{$env['PYTHONPATH']}" : '');
        $env['PYTHONUNBUFFERED'] = '1';
        $log = "{$this->folder}/daemon.log";
        $python = getenv('SMTPGATE_TEST_PYTHON') ?: 'python3';
        $command = [$python, '-m', 'smtpgate', 'serve', '--config', "{$this->folder}/smtpgate.toml",
                    '--log-format', 'json'];
        $io = [0 => ['file', '/dev/null', 'r'], 1 => ['file', $log, 'a'], 2 => ['file', $log, 'a']];
        $process = proc_open($command, $io, $pipes, $this->folder, $env);
        if ($process === false) {
            throw new \RuntimeException("cannot run {$python}");
        }
        $this->process = $process;
        $deadline = microtime(true) + self::START_TIMEOUT;
        while (microtime(true) < $deadline) {
            if (!proc_get_status($process)['running']) {
                $this->abandon("the daemon ({$python} -m smtpgate serve) exited");
            }
            $tcp = null;
            foreach (explode("\n", $this->log()) as $line) {
                $event = json_decode($line, true);
                if (($event['event'] ?? '') === 'listening' && !str_starts_with($event['address'], '/')) {
                    $tcp ??= $event['address'];
                }
                if (($event['event'] ?? '') === 'started' && $tcp !== null) {
                    $this->uri = "tcp://{$tcp}";
                    $this->unixUri = "unix://{$this->folder}/smtpgate.sock";
                    return;
                }
            }
            usleep(20000);
        }
        $this->abandon('the daemon did not start');
    }

    /** Stops what started and throws \RuntimeException with $why and the daemon's log. */
    private function abandon(string $why): never
    {
        $log = $this->log();
        $this->stop();
        throw new \RuntimeException("{$why}:\n{$log}");
    }

    /** @param array<string, scalar|list<scalar>> $values */
    private static function toml(array $values): string
    {
        // A JSON string, number or boolean is a TOML one too, given unescaped slashes.
        $flags = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR;
        $literal = static fn ($v) => json_encode($v, $flags);
        $lines = '';
        foreach ($values as $key => $value) {
            $lines .= "{$key} = " . (is_array($value) ? '[' . implode(', ', array_map($literal, $value)) . ']'
                                                      : $literal($value)) . "\n";
        }
        return $lines;
    }

    private static function remove(string $path): void
    {
        if (is_dir($path) && !is_link($path)) {
            foreach (scandir($path) as $name) {
                if ($name !== '.' && $name !== '..') {
                    self::remove("{$path}/{$name}");
                }
            }
            rmdir($path);
        } elseif (file_exists($path) || is_link($path)) {
            unlink($path);
        }
    }
}
