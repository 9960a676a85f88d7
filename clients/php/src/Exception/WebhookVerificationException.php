<?php

declare(strict_types=1);

namespace SmtpGate\Exception;

/**
 * A webhook request that did not come from smtpgate as it claims: a header
 * missing, a timestamp outside the tolerance (a replay), no signature that
 * matches the body under the secret, or a body that is not JSON. Answer it
 * with a 4xx and do not act on it.
 */
final class WebhookVerificationException extends \RuntimeException
{
}
