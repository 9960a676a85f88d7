<?php

declare(strict_types=1);

namespace SmtpGate\Tests\Support;

/**
 * A message as the upstream received it: one .eml file written by the
 * daemon's embedded dev upstream (the envelope in two X-Smtpgate-Dev-Envelope
 * header fields, then the DATA as received, CRLF line ends).
 *
 * Reads just enough MIME for the tests' assertions: header fields decoded
 * from RFC 2047, multipart bodies split at their boundaries (RFC 2046 5.1.1),
 * leaf parts decoded from base64 or quoted-printable, attachment file names
 * decoded from RFC 2231.
 */
final class Mail
{
    /**
     * @param list<string> $envelopeTo sorted
     * @param array<string, string> $headers lower-case field name => value as received (unfolded)
     * @param list<array{type: string, filename: ?string, content: string}> $parts the leaf parts
     */
    private function __construct(
        public readonly string $envelopeFrom,
        public readonly array $envelopeTo,
        public readonly string $data,
        private readonly array $headers,
        private readonly array $parts
    ) {
    }

    public static function fromFile(string $path): self
    {
        $file = (string) file_get_contents($path);
        $envelope = '/\AX-Smtpgate-Dev-Envelope-From: (.*)\r\nX-Smtpgate-Dev-Envelope-To: (.*)\r\n/';
        if (preg_match($envelope, $file, $m) !== 1) {
            throw new \UnexpectedValueException("{$path} does not start with the dev upstream's envelope");
        }
        $to = explode(', ', $m[2]);
        sort($to);
        $data = substr($file, strlen($m[0]));
        [$headerBlock, $body] = self::split($data);
        return new self($m[1], $to, $data, self::headers($headerBlock), self::leaves($headerBlock, $body));
    }

    /** The header field $name, RFC 2047 words decoded; null when absent. */
    public function header(string $name): ?string
    {
        $value = $this->headers[strtolower($name)] ?? null;
        return $value === null ? null : iconv_mime_decode($value, ICONV_MIME_DECODE_CONTINUE_ON_ERROR, 'UTF-8');
    }

    /** The decoded content of the first $type part that is not an attachment (LF line ends). */
    public function body(string $type = 'text/plain'): string
    {
        foreach ($this->parts as $part) {
            if ($part['type'] === $type && $part['filename'] === null) {
                return str_replace("\r\n", "\n", $part['content']);
            }
        }
        throw new \UnderflowException("no {$type} part in:\n{$this->data}");
    }

    /** @return array<string, string> file name => decoded content */
    public function attachments(): array
    {
        $found = [];
        foreach ($this->parts as $part) {
            if ($part['filename'] !== null) {
                $found[$part['filename']] = $part['content'];
            }
        }
        return $found;
    }

    /** @return array{0: string, 1: string} the header block and the body */
    private static function split(string $entity): array
    {
        $parts = explode("\r\n\r\n", $entity, 2);
        return [$parts[0], $parts[1] ?? ''];
    }

    /** @return array<string, string> */
    private static function headers(string $block): array
    {
        $fields = [];
        foreach (explode("\r\n", preg_replace('/\r\n(?=[ \t])/', '', $block)) as $line) {
            [$name, $value] = explode(':', $line, 2) + [1 => ''];
            $fields[strtolower(trim($name))] ??= trim($value);
        }
        return $fields;
    }

    /** @return list<array{type: string, filename: ?string, content: string}> */
    private static function leaves(string $headerBlock, string $body): array
    {
        $headers = self::headers($headerBlock);
        $contentType = $headers['content-type'] ?? 'text/plain';
        $type = strtolower(trim(explode(';', $contentType)[0]));
        if (str_starts_with($type, 'multipart/')) {
            // Each delimiter is CRLF "--" boundary; the one after the last part ends in "--".
            $sections = explode("\r\n--" . self::parameter($contentType, 'boundary'), "\r\n" . $body);
            $leaves = [];
            foreach (array_slice($sections, 1) as $section) {
                if (str_starts_with($section, '--')) {
                    break;
                }
                [$partHeaders, $partBody] = self::split(substr($section, strpos($section, "\r\n") + 2));
                array_push($leaves, ...self::leaves($partHeaders, $partBody));
            }
            return $leaves;
        }
        $content = match (strtolower($headers['content-transfer-encoding'] ?? '7bit')) {
            'base64' => base64_decode($body),
            'quoted-printable' => quoted_printable_decode($body),
            default => $body,
        };
        return [['type' => $type, 'filename' => self::filename($headers['content-disposition'] ?? ''),
                 'content' => $content]];
    }

    private static function filename(string $disposition): ?string
    {
        if (preg_match("/filename\\*=[^']*'[^']*'([^;\\s]+)/i", $disposition, $m) === 1) {
            return rawurldecode($m[1]);
        }
        $name = self::parameter($disposition, 'filename');
        return $name === null ? null : iconv_mime_decode($name, ICONV_MIME_DECODE_CONTINUE_ON_ERROR, 'UTF-8');
    }

    private static function parameter(string $value, string $name): ?string
    {
        return preg_match('/;\s*' . $name . '="?([^";]*)"?/i', $value, $m) === 1 ? $m[1] : null;
    }
}
