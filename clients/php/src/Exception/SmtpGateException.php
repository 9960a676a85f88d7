<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * Base of every exception the client throws for a failed request.
 *
 * Catch this to handle "the mail was not handed over" in one place. Misuse of
 * the API (a non-UTF-8 string, a URI with an unknown scheme) throws PHP's own
 * \InvalidArgumentException instead: that is a bug to fix, not a failure to
 * handle at run time.
 */
class SmtpGateException extends \RuntimeException
{
}
