<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/** ERR BAD_ADDRESS: an address that is not valid. */
final class BadAddressException extends ServerException
{
}
