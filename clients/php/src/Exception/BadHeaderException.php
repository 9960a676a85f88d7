<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR BAD_HEADER: a header name or value that would break the message (CR, LF, NUL, bad name). */
final class BadHeaderException extends ServerException
{
}
