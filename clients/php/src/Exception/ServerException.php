<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * The daemon answered `ERR CODE TEXT`.
 *
 * Every protocol error code has its own subclass (BadAddressException for
 * BAD_ADDRESS, ...); a code this client does not know yet arrives as a plain
 * ServerException, so catching ServerException catches every refusal.
 * The connection stays usable after a ServerException.
 */
class ServerException extends SmtpGateException
{
    /** Codes after which the same request may succeed later (docs/protocol.md, "Error codes"). */
    private const RETRYABLE_CODES = ['BUSY', 'INTERNAL'];

    public function __construct(
        private readonly string $errorCode,
        private readonly string $errorText,
        private readonly string $endpoint = '',
    ) {
        $where = $endpoint === '' ? '' : " [{$endpoint}]";
        parent::__construct("{$errorCode}: {$errorText}{$where}");
    }

    /** The protocol error code, e.g. "BAD_ADDRESS". */
    public function getErrorCode(): string
    {
        return $this->errorCode;
    }

    /** The daemon's explanation, for people. */
    public function getErrorText(): string
    {
        return $this->errorText;
    }

    /** The daemon that answered, e.g. "tcp://127.0.0.1:2526". */
    public function getEndpoint(): string
    {
        return $this->endpoint;
    }

    /** True when nothing was stored and the same request may succeed later (BUSY, INTERNAL). */
    public function isRetryable(): bool
    {
        return in_array($this->errorCode, self::RETRYABLE_CODES, true);
    }
}
