<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * Connecting, writing or waiting for a reply took longer than the configured
 * timeout. The connection is closed before this is thrown; as with any broken
 * connection, a SEND may or may not have been stored.
 */
final class TimeoutException extends ConnectionException
{
}
