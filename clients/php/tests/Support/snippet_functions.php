<?php

/*
 * The functions of the PHP snippets that tests/test_php_client.py runs under
 * real `php` (loaded by ../harness.php): outcome() lets a snippet report a
 * value or an exception as JSON for pytest to assert on.
 */

declare(strict_types=1);

/**
 * Runs $call and returns ['value' => its result], or for an exception the
 * short class name, the protocol code and text when it carries them, and
 * the message.
 */
function outcome(callable $call): array
{
    try {
        return ['value' => $call()];
    } catch (\Throwable $e) {
        return describe($e);
    }
}

/** An exception as a JSON-friendly array (see outcome()). */
function describe(\Throwable $e): array
{
    $described = ['class' => (new \ReflectionClass($e))->getShortName(), 'message' => $e->getMessage()];
    $described['is_smtpgate'] = $e instanceof \SmtpGate\Exception\SmtpGateException;
    if ($e instanceof \SmtpGate\Exception\ServerException) {
        $described += ['code' => $e->getErrorCode(), 'text' => $e->getErrorText(), 'retryable' => $e->isRetryable()];
    }
    return $described;
}

/** Prints $result as the one JSON document the pytest side reads. */
function report(mixed $result): void
{
    $flags = JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE | JSON_THROW_ON_ERROR;
    echo json_encode($result, $flags), "\n";
}
