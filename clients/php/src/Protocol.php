<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\AuthFailedException;
use SmtpGate\Exception\AuthRequiredException;
use SmtpGate\Exception\BadAddressException;
use SmtpGate\Exception\BadHeaderException;
use SmtpGate\Exception\BadRequestException;
use SmtpGate\Exception\BusyException;
use SmtpGate\Exception\DeniedException;
use SmtpGate\Exception\InternalException;
use SmtpGate\Exception\NotFoundException;
use SmtpGate\Exception\ProtocolException;
use SmtpGate\Exception\ServerException;
use SmtpGate\Exception\TooLargeException;

/**
 * The smtpgate line protocol without any I/O (docs/protocol.md): request lines in,
 * reply lines out. Connection does the socket work; this class only turns
 * values into bytes and bytes into values or exceptions.
 */
final class Protocol
{
    /** ERR codes of docs/protocol.md ("Error codes") and the class that carries each. */
    public const ERROR_CLASSES = [
        'BAD_REQUEST' => BadRequestException::class,
        'BAD_ADDRESS' => BadAddressException::class,
        'BAD_HEADER' => BadHeaderException::class,
        'TOO_LARGE' => TooLargeException::class,
        'AUTH_REQUIRED' => AuthRequiredException::class,
        'AUTH_FAILED' => AuthFailedException::class,
        'NOT_FOUND' => NotFoundException::class,
        'DENIED' => DeniedException::class,
        'BUSY' => BusyException::class,
        'INTERNAL' => InternalException::class,
    ];

    /*
     * Raw UTF-8 is half the size of \uXXXX escapes for CJK text. PHP still
     * escapes U+2028/U+2029 and every control character (a newline in a
     * string becomes \n), so an encoded object is always exactly one line.
     */
    private const JSON_FLAGS = JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR;

    /** The fields of SEND that are JSON arrays (docs/protocol.md "SEND"): never sent as objects. */
    private const LIST_FIELDS = ['to', 'cc', 'bcc', 'reply_to', 'attachments'];

    /**
     * One request line, `VERB[ ARGUMENT]\n`. Throws \InvalidArgumentException
     * for a CR or LF in the argument: it would smuggle a second request.
     */
    public static function requestLine(string $verb, ?string $argument = null): string
    {
        if ($argument === null) {
            return $verb . "\n";
        }
        if (strpbrk($argument, "\r\n") !== false) {
            throw new \InvalidArgumentException("{$verb}: the argument must not contain CR or LF");
        }
        return $verb . ' ' . $argument . "\n";
    }

    /**
     * The argument of SEND: the message as one line of JSON. Throws
     * \InvalidArgumentException when a string is not valid UTF-8 (JSON cannot
     * carry it; encode 8-bit content as base64 first).
     */
    public static function encodeMessage(array $message): string
    {
        // An empty PHP array encodes as [], but `headers` must be an object.
        if (isset($message['headers']) && is_array($message['headers'])) {
            $message['headers'] = (object) $message['headers'];
        }
        // A list with gaps in its keys (array_filter(), array_unique(), unset())
        // would encode as {"0":...,"2":...}, which the daemon refuses.
        foreach (self::LIST_FIELDS as $field) {
            if (isset($message[$field]) && is_array($message[$field]) && !array_is_list($message[$field])) {
                $message[$field] = array_values($message[$field]);
            }
        }
        try {
            return json_encode($message, self::JSON_FLAGS);
        } catch (\JsonException $e) {
            throw new \InvalidArgumentException('message cannot be sent as JSON: ' . $e->getMessage(), 0, $e);
        }
    }

    /**
     * An id as the argument of STATUS / WAIT. Throws \InvalidArgumentException
     * for an empty id or one with spaces or control characters.
     */
    public static function checkId(string $id): string
    {
        if ($id === '' || preg_match('/[\x00-\x20\x7f]/', $id) === 1) {
            throw new \InvalidArgumentException('a message id is one token without spaces or control characters');
        }
        return $id;
    }

    /**
     * The payload of an `OK[ PAYLOAD]` reply line (CRLF already removed):
     * '' for a bare OK. Throws the ServerException subclass of the code for
     * `ERR CODE TEXT`, ProtocolException for anything else.
     */
    public static function parseReply(string $line, string $endpoint = ''): string
    {
        if ($line === 'OK') {
            return '';
        }
        if (str_starts_with($line, 'OK ')) {
            return substr($line, 3);
        }
        if (preg_match('/^ERR ([A-Z0-9_]+)(?: (.*))?$/s', $line, $m) === 1) {
            throw self::errorFor($m[1], $m[2] ?? '', $endpoint);
        }
        throw new ProtocolException('not an smtpgate reply: ' . self::excerpt($line) . self::where($endpoint));
    }

    /** The exception for `ERR CODE TEXT`: the code's own class, ServerException for an unknown code. */
    public static function errorFor(string $code, string $text, string $endpoint = ''): ServerException
    {
        $class = self::ERROR_CLASSES[$code] ?? ServerException::class;
        return new $class($code, $text, $endpoint);
    }

    /** The id in the payload of a SEND reply. Throws ProtocolException when there is none. */
    public static function parseId(string $payload, string $endpoint = ''): string
    {
        if ($payload === '' || preg_match('/[\x00-\x20\x7f]/', $payload) === 1) {
            throw new ProtocolException(
                'SEND answered without a message id: ' . self::excerpt($payload) . self::where($endpoint)
            );
        }
        return $payload;
    }

    /** A JSON object payload (STATUS, WAIT, STATS) as an array. Throws ProtocolException for anything else. */
    public static function decodeObject(string $payload, string $endpoint = ''): array
    {
        try {
            $value = json_decode($payload, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException $e) {
            throw new ProtocolException('reply is not JSON: ' . $e->getMessage() . self::where($endpoint), 0, $e);
        }
        if (!is_array($value) || !str_starts_with(ltrim($payload), '{')) {
            throw new ProtocolException(
                'reply is not a JSON object: ' . self::excerpt($payload) . self::where($endpoint)
            );
        }
        return $value;
    }

    /** The seconds argument of WAIT: an integer where possible, else a short decimal. */
    public static function formatSeconds(int|float $seconds): string
    {
        if ($seconds < 0 || !is_finite((float) $seconds)) {
            throw new \InvalidArgumentException('seconds must be a finite number >= 0');
        }
        if ((float) $seconds === floor((float) $seconds)) {
            return (string) (int) $seconds;
        }
        return rtrim(rtrim(sprintf('%.3F', $seconds), '0'), '.');
    }

    /** The start of a reply for an error message: never a whole 8 MiB line. */
    private static function excerpt(string $bytes): string
    {
        return json_encode(substr($bytes, 0, 80), JSON_INVALID_UTF8_SUBSTITUTE | JSON_UNESCAPED_UNICODE);
    }

    private static function where(string $endpoint): string
    {
        return $endpoint === '' ? '' : " [{$endpoint}]";
    }
}
