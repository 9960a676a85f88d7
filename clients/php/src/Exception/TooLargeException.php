<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR TOO_LARGE: the request line or the built message is over the daemon's limit. */
final class TooLargeException extends ServerException
{
}
