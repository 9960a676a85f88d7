<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR AUTH_REQUIRED: the daemon wants AUTH first: pass ['token' => ...] or call auth(). */
final class AuthRequiredException extends ServerException
{
}
