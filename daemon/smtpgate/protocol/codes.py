"""The error codes of the line protocol (PROTOCOL.md, "Error codes").

A reply is `ERR CODE TEXT`: CODE is one of these tokens, TEXT is for people.
Callers branch on the code, so the spelling here is part of the wire contract.
"""

BAD_REQUEST = "BAD_REQUEST"      # unknown verb, bad JSON, wrong field types
BAD_ADDRESS = "BAD_ADDRESS"      # an address that is not valid
BAD_HEADER = "BAD_HEADER"        # a header name or value that would break the message
TOO_LARGE = "TOO_LARGE"          # the line or the built message is over the limit
AUTH_REQUIRED = "AUTH_REQUIRED"  # a verb other than PING/HELLO/HELP/AUTH/QUIT before AUTH
AUTH_FAILED = "AUTH_FAILED"      # wrong token
NOT_FOUND = "NOT_FOUND"          # STATUS or WAIT of an unknown id
DENIED = "DENIED"                # sender or recipient outside the configured policy
BUSY = "BUSY"                    # back-pressure: nothing stored, retry later
INTERNAL = "INTERNAL"            # the daemon failed: nothing stored, retry

ALL_CODES = frozenset({
    BAD_REQUEST, BAD_ADDRESS, BAD_HEADER, TOO_LARGE, AUTH_REQUIRED,
    AUTH_FAILED, NOT_FOUND, DENIED, BUSY, INTERNAL,
})

# Codes after which the very same request may succeed later (PROTOCOL.md,
# column "retry the same request?"); AUTH_REQUIRED only after an AUTH.
RETRYABLE_CODES = frozenset({BUSY, INTERNAL})
