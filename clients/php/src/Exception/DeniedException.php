<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR DENIED: the sender or a recipient is outside the daemon's policy. */
final class DeniedException extends ServerException
{
}
