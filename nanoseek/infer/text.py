"""Text as it is produced: incremental detokenization that never splits a UTF-8 character,
and stop strings that end the output before them (and are never streamed in part)."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids one at a time; `push` returns the text that is now safe to show.

    Byte-level BPE can end a token in the middle of a multi-byte character; the decoder then
    yields U+FFFD, so text is held back until the character completes. Text that could be the
    start of a stop string is held back too, until it is known not to be one."""

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tok = tokenizer
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # tokens before this index are fully decoded into self.decoded
        self.decoded = ""  # text of ids[:prefix]
        self.text = ""  # all text so far (complete characters)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the newly safe text (may be empty). After a stop string, nothing."""
        if self.stopped:
            return ""
        self.ids.append(token)
        tail = self.tok.decode(self.ids[self.prefix:], keep_special=True)
        if tail.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        self.text = self.decoded + tail
        if len(self.ids) - self.prefix > 8:  # keep the re-decoded window short
            self.decoded, self.prefix = self.text, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        end = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def flush(self) -> str:
        """At the end of the output: whatever was held back for a possible stop string."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
