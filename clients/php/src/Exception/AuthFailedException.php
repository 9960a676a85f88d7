<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR AUTH_FAILED: the token was refused. */
final class AuthFailedException extends ServerException
{
}
