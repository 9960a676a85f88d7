<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\SmtpGateException;

/**
 * What Client::sendMany() did with each message, under the keys the messages
 * were given with: every key is in exactly one of $ids and $errors.
 */
final class BatchResult
{
    /**
     * @param array<int|string, string>             $ids    message key => id the daemon stored it under
     * @param array<int|string, SmtpGateException>  $errors message key => why it was not stored: a
     *        ServerException (refused; nothing stored) or a ConnectionException (the connection broke
     *        before its reply: it may or may not have been stored)
     */
    public function __construct(
        public readonly array $ids,
        public readonly array $errors,
    ) {
    }

    /** True when every message was stored. */
    public function ok(): bool
    {
        return $this->errors === [];
    }
}
