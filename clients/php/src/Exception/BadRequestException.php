<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR BAD_REQUEST: not a known verb, bad JSON or wrong field types. */
final class BadRequestException extends ServerException
{
}
