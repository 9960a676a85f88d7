<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * The peer's reply does not follow the smtpgate line protocol (not `OK ...` or
 * `ERR CODE TEXT`, no CRLF, bad JSON, too long). The connection is closed
 * before this is thrown, because later replies could be out of step.
 */
final class ProtocolException extends SmtpGateException
{
}
