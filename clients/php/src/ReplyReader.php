<?php

declare(strict_types=1);

namespace SmtpGate;

use SmtpGate\Exception\ProtocolException;

/**
 * Splits received bytes into reply lines (sans-IO, the h11 receive-buffer
 * shape): feed() what the socket gave, take lines with nextLine(). A reply
 * ends in CRLF (docs/protocol.md, "Framing"); one read may hold several replies
 * (pipelining) or part of one.
 */
final class ReplyReader
{
    /*
     * The longest reply accepted, CRLF excluded. The longest replies are
     * STATUS/WAIT: a recipient entry is about 600 bytes with a full SMTP
     * reply (RFC 5321 4.5.3.1.5 allows 512 octets a line), so 8 MiB covers
     * over 10,000 recipients and still bounds what a broken peer can make
     * us hold.
     */
    public const MAX_LINE = 8 * 1024 * 1024;

    private string $buffer = '';
    /** How far the buffer was already searched for LF, so a long line is not rescanned on every feed. */
    private int $searched = 0;

    public function __construct(private readonly int $maxLine = self::MAX_LINE)
    {
    }

    public function feed(string $bytes): void
    {
        $this->buffer .= $bytes;
    }

    /**
     * The next complete reply line without its CRLF, or null when more bytes
     * are needed. Throws ProtocolException for a line without CR before LF or
     * longer than the limit.
     */
    public function nextLine(): ?string
    {
        $lf = strpos($this->buffer, "\n", $this->searched);
        if ($lf === false) {
            $this->searched = strlen($this->buffer);
            if ($this->searched > $this->maxLine + 1) {
                throw new ProtocolException("reply longer than {$this->maxLine} bytes");
            }
            return null;
        }
        if ($lf === 0 || $this->buffer[$lf - 1] !== "\r") {
            throw new ProtocolException('reply line does not end in CRLF');
        }
        if ($lf - 1 > $this->maxLine) {
            throw new ProtocolException("reply longer than {$this->maxLine} bytes");
        }
        $line = substr($this->buffer, 0, $lf - 1);
        $this->buffer = substr($this->buffer, $lf + 1);
        $this->searched = 0;
        return $line;
    }

    /** Bytes received and not yet returned as a line. */
    public function pendingBytes(): int
    {
        return strlen($this->buffer);
    }
}
