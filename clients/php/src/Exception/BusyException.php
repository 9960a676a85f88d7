<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR BUSY: back-pressure (spool full, disk low); nothing was stored, retry later. */
final class BusyException extends ServerException
{
}
