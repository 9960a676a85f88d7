<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR INTERNAL: the daemon failed; nothing was stored, the request may be retried. */
final class InternalException extends ServerException
{
}
