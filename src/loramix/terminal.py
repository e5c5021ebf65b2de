"""What loramix prints reaches a terminal: text that users and bank authors wrote (entry folder names, paths, dataset
text, prompts, answers, error messages) is shown, never obeyed. `SafeConsole`, the console every command prints
through, writes each control character of such text (ESC, which starts a terminal escape sequence, and every other C0
/ C1 control but newline and tab; the bidirectional overrides; a byte of a file name that is not UTF-8) as a visible
escape: `\\x1b`, `\\u202e`, `\\xff`. The console's own styles and cursor moves are unaffected."""

from __future__ import annotations

import re
from typing import Iterable, Optional

from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment
from rich.text import Text

# C0 controls but \t and \n, DEL and the C1 controls (0x9b is a one-byte CSI), the bidirectional embeddings, overrides
# and isolates, and the lone surrogates Python decodes a non-UTF-8 byte of a file name to (surrogateescape)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the byte c - 0xDC00 of a name that is not UTF-8
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def sanitize(text: str) -> str:
    """`text` with every character that a terminal would act on written as a visible escape (idempotent)."""
    return _UNSAFE.sub(_escape, text)


class SafeConsole(Console):
    """A rich Console that prints no control character of the text it is given (`sanitize`): strings (table cells,
    titles, messages) are cleaned before they are measured and wrapped, Text objects before they are rendered, and,
    last, every segment but the console's own control codes."""

    def _check_buffer(self) -> None:
        """Write what is buffered; a stream that refuses it (a full disk, /dev/full, a closed pipe) is named in the
        error, which otherwise names no file."""
        try:
            super()._check_buffer()
        except OSError as e:
            where = "standard error" if self.stderr else "standard output"
            raise OSError(e.errno, e.strerror, f"{where} (what the command wrote to files was written)") from None

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(sanitize(text), **kwargs)

    def render(self, renderable: RenderableType, options: Optional[ConsoleOptions] = None) -> Iterable[Segment]:
        if isinstance(renderable, Text) and _UNSAFE.search(renderable.plain):
            renderable = _clean(renderable)
        for segment in super().render(renderable, options):
            if not segment.control and _UNSAFE.search(segment.text):
                segment = Segment(sanitize(segment.text), segment.style, segment.control)
            yield segment


def _clean(text: Text) -> Text:
    """A copy of `text` with its characters sanitized, each run keeping its styles (cut at every span's ends, each
    part is covered whole by the spans it has)."""
    clean = Text(justify=text.justify, overflow=text.overflow, no_wrap=text.no_wrap, end=text.end, style=text.style)
    for part in text.divide(sorted({i for span in text.spans for i in (span.start, span.end)})):
        piece = Text(sanitize(part.plain), style=part.style)
        for span in part.spans:
            piece.stylize(span.style)
        clean.append_text(piece)
    return clean
