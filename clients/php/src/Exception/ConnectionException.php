<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * The daemon could not be reached, or the connection broke during a request.
 *
 * The connection is closed before this is thrown. If it broke after a SEND was
 * written, the daemon may or may not have stored the message: send with an
 * `idempotency_key` to make a repeat safe.
 */
class ConnectionException extends SmtpGateException
{
}
