<?php

declare(strict_types=1);

namespace SmtpGate;

/**
 * Builds the entries of a message's `attachments` list (docs/protocol.md "SEND":
 * filename, content_type, content_base64, optional content_id).
 *
 *     $gate->send([..., 'attachments' => [Attachment::fromFile('/tmp/report.pdf')]]);
 */
final class Attachment
{
    public const DEFAULT_TYPE = 'application/octet-stream';

    /**
     * An attachment of the bytes in $content. A $contentId makes it an
     * inline part that HTML can show with `<img src="cid:...">`.
     */
    public static function fromString(
        string $filename,
        string $content,
        string $contentType = self::DEFAULT_TYPE,
        ?string $contentId = null
    ): array {
        $entry = ['filename' => $filename, 'content_type' => $contentType, 'content_base64' => base64_encode($content)];
        if ($contentId !== null) {
            $entry['content_id'] = $contentId;
        }
        return $entry;
    }

    /**
     * An attachment of the file at $path, named like it unless $filename is
     * given; the type from ext-fileinfo when installed, else $contentType.
     * Throws \InvalidArgumentException when the file cannot be read.
     */
    public static function fromFile(string $path, ?string $contentType = null, ?string $filename = null): array
    {
        if (!is_file($path) || !is_readable($path)) {
            throw new \InvalidArgumentException("cannot read attachment file {$path}");
        }
        $content = file_get_contents($path);
        if ($content === false) {
            throw new \InvalidArgumentException("cannot read attachment file {$path}");
        }
        if ($contentType === null) {
            $detected = function_exists('mime_content_type') ? mime_content_type($path) : false;
            $contentType = is_string($detected) && $detected !== '' ? $detected : self::DEFAULT_TYPE;
        }
        return self::fromString($filename ?? basename($path), $content, $contentType);
    }
}
