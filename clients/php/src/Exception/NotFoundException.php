<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR NOT_FOUND: STATUS or WAIT of an id the daemon does not know. */
final class NotFoundException extends ServerException
{
}
